"""`deltafleet bench peer`: deltafleet's server against llama.cpp's `llama-server`, same workload, same machine.

Both servers run as subprocesses on loopback, one after the other, each with the same base model and the same
`--adapters` LoRAs (peft directories for deltafleet, the same weights converted to GGUF for llama.cpp: see
`peer_build`, `peer_workload`). Per server:
1. Correctness: a few greedy requests (base and adapters, non-streamed) against transformers + peft in fp32
   (`peer_workload.reference_greedy`); the leading tokens that agree are reported with the reference's margin where
   they stop; a first token that differs fails the run unless that margin is a near tie for the server's precision.
   On llama.cpp a base request must also equal one with every LoRA scale explicitly 0.
2. Warm-up: one short request per model (deltafleet loads adapters on first use).
3. Phases, closed loop, streamed (`peer_client`): `base` (`clients` clients, the base), `mixed` (same, each request
   with the next adapter round-robin), `single` (one client, the base).

llama.cpp's server cannot batch requests with different LoRA configurations (a slot's LoRA set is part of its
batch), so its mixed phase measures that limitation as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from deltafleet.bench.loadgen import closed_loop
from deltafleet.bench.peer_build import (
    GGUF_TYPES,
    LLAMA_CPP_PYTHON_VERSION,
    PeerBuild,
    Reporter,
    base_gguf,
    ensure_server,
    llamacpp_command,
    lora_gguf,
    silent,
)
from deltafleet.bench.peer_client import phase_figures, stream_completion, throughput_ratios
from deltafleet.bench.peer_workload import (
    BODIES,
    PROMPT_TOKENS,
    adapter_name,
    agreeing_tokens,
    agreeing_tokens_text,
    make_lora_adapters,
    phase_plan,
    phase_prompts,
    reference_greedy,
)
from deltafleet.bench.serve import free_port, wait_healthy
from deltafleet.models.loading import load_tokenizer, resolve_base

DTYPES = ("float32", "bfloat16")
MATCHING_GGUF = {"float32": "f32", "bfloat16": "bf16"}
PHASES = ("base", "mixed", "single")
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")
HOST = "127.0.0.1"
# Logit margins (top-1 minus top-2 of the fp32 reference) under which a server computing in this precision may
# pick the other token: the logits' rounding error, about u * |logit| * sqrt(depth) with |logit| ~ 20 and u the
# unit roundoff (2^-24 fp32, 2^-11 fp16, 2^-8 bf16), rounded up.
NEAR_TIE = {"float32": 0.01, "f32": 0.01, "f16": 0.1, "bfloat16": 0.5, "bf16": 0.5}


@dataclass(frozen=True)
class PeerConfig:
    """One run. dtypes: deltafleet's serve dtypes (resolved, no `auto`); gguf_types: llama.cpp's model and LoRA
    types (default: the precision matching each dtype); check_prompts: correctness prompts each for the base and for
    adapters; llama_threads: llama-server -t / -tb."""

    base: str = "smollm2-135m"
    dtypes: tuple[str, ...] = ("float32",)
    gguf_types: tuple[str, ...] = ()
    adapters: int = 8
    clients: int = 8
    requests_per_client: int = 4
    max_tokens: int = 32
    prompt_tokens: int = PROMPT_TOKENS
    check_prompts: int = 3
    check_tokens: int = 8
    llama_threads: int = os.cpu_count() or 1
    skip_llamacpp: bool = False
    build_jobs: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("adapters", "clients", "requests_per_client", "max_tokens", "check_tokens", "llama_threads",
                  "build_jobs"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r}: must be an integer >= 1")
        if self.check_prompts < 0:
            raise ValueError(f"check_prompts={self.check_prompts}: must be >= 0")
        if self.prompt_tokens < 12:
            raise ValueError(f"prompt_tokens={self.prompt_tokens}: must be >= 12 (the tag takes about 8)")
        if not self.dtypes or any(d not in DTYPES for d in self.dtypes):
            raise ValueError(f"dtypes={self.dtypes}: must be a non-empty subset of {DTYPES}")
        if any(t not in GGUF_TYPES for t in self.gguf_types):
            raise ValueError(f"gguf_types={self.gguf_types}: each must be one of {GGUF_TYPES}")

    @property
    def context_per_request(self) -> int:
        """Tokens of context each server keeps per sequence: prompt + output, rounded up to 256."""
        return 256 * -(-(self.prompt_tokens + max(self.max_tokens, self.check_tokens)) // 256)

    @property
    def llama_types(self) -> tuple[str, ...]:
        """The GGUF types to run: as given, else the one matching each deltafleet dtype (fp32 -> f32, bf16 -> bf16)."""
        return self.gguf_types or tuple(dict.fromkeys(MATCHING_GGUF[d] for d in self.dtypes))


def quick_config(**kw) -> PeerConfig:
    """A check in about 3 minutes on 2 cores (after the one-time build): 1 request per client, 16 tokens."""
    return PeerConfig(**{"requests_per_client": 1, "max_tokens": 16, **kw})


def parse_choices(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """Repeated and comma-separated option values, in order, without duplicates; each must be in `allowed`."""
    out = tuple(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))
    bad = [v for v in out if v not in allowed]
    if bad:
        raise ValueError(f"{what} {', '.join(map(repr, bad))}: must be one of {', '.join(allowed)}")
    return out


def this_cpu() -> dict:
    """`cpu_info` of this machine plus its core count (what every benchmark report records)."""
    cpu = Path("/proc/cpuinfo")
    return {**cpu_info(cpu.read_text() if cpu.exists() else ""), "count": os.cpu_count()}


def cpu_info(cpuinfo: str) -> dict:
    """The CPU model and the SIMD flags that matter for these kernels, from /proc/cpuinfo's text."""
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def deltafleet_command(base: str, adapters_dir: Path, port: int, dtype: str, max_batch: int,
                       max_model_len: int) -> list[str]:
    """`deltafleet serve` on loopback, the base named `base`, every adapter of `adapters_dir` (LoRA slots: the
    engine's default 32)."""
    return [sys.executable, "-m", "deltafleet.cli", "serve", "--base", base, "--adapters", str(adapters_dir),
            "--host", HOST, "--port", str(port), "--dtype", dtype, "--max-batch", str(max_batch),
            "--max-model-len", str(max_model_len), "--log-level", "warning", "--model-name", "base"]


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait for GET /health, yield; then SIGINT (SIGKILL after 30 s). Output goes to `log_path`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(f"http://{HOST}:{port}", proc)
        except RuntimeError as e:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{Path(cmd[0]).name}: {e}; its last output:\n{tail}") from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _post(port: int, path: str, body: object) -> object:
    import httpx

    r = httpx.post(f"http://{HOST}:{port}{path}", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


@dataclass(frozen=True)
class CheckCase:
    """A correctness request and the reference's greedy tokens, with the top-1 minus top-2 logit of each."""

    prompt: list[int]
    adapter: int | None
    reference: list[int]
    margins: list[float]


def case_row(c: CheckCase, agree: int, near_tie: float) -> dict:
    """One case's verdict: `agree` leading tokens equal the reference's; where they stop, the reference's margin."""
    n = len(c.reference)
    margin = None if agree >= n else c.margins[agree]
    return {"adapter": None if c.adapter is None else adapter_name(c.adapter), "agree": agree, "of": n,
            "first_divergence": None if agree >= n else agree, "reference_margin": margin,
            "near_tie": margin is not None and margin < near_tie}


def check_server(server: str, port: int, cases: Sequence[CheckCase], decode: Callable[[Sequence[int]], str],
                 near_tie: float) -> dict:
    """Greedy answers against the reference: per case the agreeing leading tokens, the first divergent position and
    the reference's margin there. A first token that differs fails the run unless the reference's margin is below
    `near_tie` (the precision's logit error: `NEAR_TIE`). llama.cpp answers token ids (its /completion with
    return_tokens); deltafleet answers text."""
    rows = []
    for c in cases:
        n = len(c.reference)
        if server == "llama.cpp":
            body = {**BODIES[server](c.prompt, c.adapter, n, False), "return_tokens": True, "n_predict": n}
            ans = _post(port, "/completion", body)
            agree = agreeing_tokens(c.reference, ans["tokens"])
        else:
            ans = _post(port, "/v1/completions", BODIES[server](c.prompt, c.adapter, n, False))
            agree = agreeing_tokens_text(c.reference, ans["choices"][0]["text"], decode)
        rows.append(case_row(c, agree, near_tie))
    return {"cases": rows, "exact": sum(r["first_divergence"] is None for r in rows), "of": len(rows),
            "near_tie_below": near_tie,
            "first_token_mismatch": any(r["agree"] == 0 and not r["near_tie"] for r in rows)}


def llamacpp_zero_scales(port: int, n_adapters: int, probe: list[int], n_tokens: int) -> bool:
    """Set every global LoRA scale to 0 (`--lora-init-without-apply` loads them at 1.0 in this version); True when a
    base request then equals one listing every adapter at scale 0."""
    _post(port, "/lora-adapters", [{"id": i, "scale": 0.0} for i in range(n_adapters)])
    base = {**BODIES["llama.cpp"](probe, None, n_tokens, False), "return_tokens": True, "n_predict": n_tokens}
    zeros = {**base, "lora": [{"id": i, "scale": 0.0} for i in range(n_adapters)]}
    return _post(port, "/completion", base)["tokens"] == _post(port, "/completion", zeros)["tokens"]


def _closed_loop(port: int, bodies: list[dict], clients: int) -> tuple[list, float]:
    async def send(body):
        return await stream_completion(HOST, port, body)

    return asyncio.run(closed_loop(send, bodies, clients))


def measure(server: str, port: int, prompts: dict[str, list[list[int]]], cfg: PeerConfig,
            log: Callable[[str], None]) -> dict:
    """Warm-up (one short request per model at once), then the three phases; figures per phase."""
    body = BODIES[server]
    warm = [body(prompts["warm"][k], k if k < cfg.adapters else None, 2) for k in range(cfg.adapters + 1)]
    _closed_loop(port, warm, len(warm))
    out = {}
    for phase in PHASES:
        clients = 1 if phase == "single" else cfg.clients
        bodies = phase_plan(prompts[phase], clients * cfg.requests_per_client,
                            cfg.adapters if phase == "mixed" else None, cfg.max_tokens, body)
        results, seconds = _closed_loop(port, bodies, clients)
        out[phase] = phase_figures(results, seconds)
        log(f"  {server} {phase}: {out[phase]['ok']}/{out[phase]['requests']} ok, "
            f"{out[phase]['output_tok_s']} tok/s in {seconds:.1f} s")
    return out


def _rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def _versions(server: Path | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("deltafleet", "torch", "transformers", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    if server is not None:
        r = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60)
        out["llama-server"] = " ".join((r.stdout + r.stderr).split())[-200:]
    return out


@dataclass
class Workload:
    """What every server run shares: adapters on disk, prompts per phase, the correctness cases."""

    hf_dir: Path
    tmp: Path
    adapters_dir: Path
    names: list[str]
    prompts: dict[str, list[list[int]]]
    cases: list[CheckCase]
    decode: Callable[[Sequence[int]], str]


def prepare(cfg: PeerConfig, tmp: Path, log: Callable[[str], None]) -> tuple[Workload, list[bool]]:
    """Adapters, prompts and the reference answers; also, per adapter case, whether the adapter changes the base's
    greedy answer on that prompt (it should: the check must be able to tell an adapter from the base)."""
    hf_dir = resolve_base(cfg.base)
    tok = load_tokenizer(hf_dir)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    def decode(ids: Sequence[int]) -> str:
        return tok.decode(list(ids), skip_special_tokens=True)

    total = cfg.clients * cfg.requests_per_client
    prompts = {"warm": phase_prompts(encode, "warm", cfg.adapters + 1, cfg.prompt_tokens),
               "base": phase_prompts(encode, "base", total, cfg.prompt_tokens),
               "mixed": phase_prompts(encode, "mixed", total, cfg.prompt_tokens),
               "single": phase_prompts(encode, "single", cfg.requests_per_client, cfg.prompt_tokens)}
    t0 = time.perf_counter()
    adapters_dir = tmp / "adapters"
    names = make_lora_adapters(hf_dir, adapters_dir, cfg.adapters, cfg.seed)
    log(f"{len(names)} LoRA adapters (r16, alpha 32, 7 projections) in {time.perf_counter() - t0:.1f} s")
    check = phase_prompts(encode, "check", 2 * cfg.check_prompts, cfg.prompt_tokens)
    specs = ([(p, None) for p in check[:cfg.check_prompts]]
             + [(p, k % cfg.adapters) for k, p in enumerate(check[cfg.check_prompts:])])
    on_adapter_prompts = [(p, None) for p, a in specs if a is not None]
    t0 = time.perf_counter()
    refs = reference_greedy(hf_dir, adapters_dir, [(p, None if a is None else adapter_name(a))
                                                   for p, a in specs + on_adapter_prompts], cfg.check_tokens)
    cases = [CheckCase(p, a, *r) for (p, a), r in zip(specs, refs, strict=False)]
    differs = [c.reference != b[0] for c, b in zip([c for c in cases if c.adapter is not None], refs[len(specs):],
                                                   strict=True)]
    log(f"reference (transformers + peft, fp32): {len(refs)} greedy answers in {time.perf_counter() - t0:.1f} s; "
        f"adapters change the answer in {sum(differs)}/{len(differs)}")
    return Workload(hf_dir, tmp, adapters_dir, names, prompts, cases, decode), differs


def run_deltafleet(cfg: PeerConfig, w: Workload, dtype: str, log: Callable[[str], None]) -> dict:
    port = free_port()
    log(f"deltafleet serve ({dtype}), max batch {cfg.clients}")
    t0 = time.perf_counter()
    cmd = deltafleet_command(cfg.base, w.adapters_dir, port, dtype, cfg.clients, cfg.context_per_request)
    with server_process(cmd, port, w.tmp / f"deltafleet-{dtype}.log") as proc:
        startup = time.perf_counter() - t0
        correctness = check_server("deltafleet", port, w.cases, w.decode, NEAR_TIE[dtype])
        phases = measure("deltafleet", port, w.prompts, cfg, log)
        rss = _rss_mb(proc.pid)
    engine = measure_engine(cfg, w, dtype)
    log(f"  in-process engine, base phase's requests: {engine['output_tok_s']} tok/s")
    return {"label": f"deltafleet {dtype}", "server": "deltafleet", "dtype": dtype, "startup_s": round(startup, 1),
            "rss_mb": rss, "correctness": correctness, "phases": phases, "engine": engine}


def measure_engine(cfg: PeerConfig, w: Workload, dtype: str) -> dict:
    """The base phase's requests through an in-process `Engine` with the server's settings and no HTTP (after the
    server has stopped): `served base / engine` is what the HTTP layer, detokenization and SSE cost."""
    from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams

    engine = Engine.from_pretrained(cfg.base, config=EngineConfig(dtype=dtype, max_batch=cfg.clients,
                                                                  max_model_len=cfg.context_per_request))
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([Request(prompt_ids=p, params=SamplingParams(max_tokens=2)) for p in w.prompts["warm"]])
    n = cfg.clients * cfg.requests_per_client
    t0 = time.perf_counter()
    outs = engine.generate([Request(prompt_ids=p, params=params) for p in w.prompts["base"][:n]])
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"requests": n, "seconds": round(seconds, 2), "output_tokens": tokens,
            "output_tok_s": round(tokens / seconds, 2)}


def run_llamacpp(cfg: PeerConfig, w: Workload, build: PeerBuild, gguf_type: str, log: Callable[[str], None],
                 progress: Reporter) -> dict:
    t0 = time.perf_counter()
    model = base_gguf(build, w.hf_dir, gguf_type)
    step = f"convert LoRAs to GGUF {gguf_type}"
    loras = []
    for i, name in enumerate(w.names):
        progress(step, i, len(w.names))
        loras.append(lora_gguf(build, w.adapters_dir / name, w.hf_dir, w.tmp / f"{name}-{gguf_type}.gguf", gguf_type))
    progress(step, len(w.names), len(w.names))
    log(f"GGUF {gguf_type}: base + {len(loras)} LoRAs ready in {time.perf_counter() - t0:.1f} s")
    port = free_port()
    cmd = llamacpp_command(build.server, model, loras, HOST, port, cfg.clients,
                           ctx_per_slot=cfg.context_per_request, threads=cfg.llama_threads)
    log(f"llama-server ({gguf_type}), -np {cfg.clients} -t {cfg.llama_threads}")
    t0 = time.perf_counter()
    with server_process(cmd, port, w.tmp / f"llama-{gguf_type}.log") as proc:
        startup = time.perf_counter() - t0
        zero_ok = llamacpp_zero_scales(port, len(loras), w.prompts["warm"][-1], cfg.check_tokens)
        correctness = {**check_server("llama.cpp", port, w.cases, w.decode, NEAR_TIE[gguf_type]),
                       "base_equals_zero_scales": zero_ok}
        phases = measure("llama.cpp", port, w.prompts, cfg, log)
        rss = _rss_mb(proc.pid)
    return {"label": f"llama.cpp {gguf_type}", "server": "llama.cpp", "dtype": gguf_type,
            "startup_s": round(startup, 1), "rss_mb": rss, "correctness": correctness, "phases": phases,
            "command": " ".join(["llama-server", *cmd[1:]]).replace(str(w.tmp), "$TMP")}


def failures(runs: Sequence[dict]) -> list[str]:
    """What makes the run fail: a first token unlike the reference, llama.cpp's base not equal to all scales 0,
    failed requests."""
    out = [f"{r['label']}: first generated token differs from transformers + peft" for r in runs
           if r["correctness"]["first_token_mismatch"]]
    out += [f"{r['label']}: a base request differs from one with every LoRA scale 0" for r in runs
            if r["correctness"].get("base_equals_zero_scales") is False]
    out += [f"{r['label']} {p}: {f['requests'] - f['ok']} failed requests: {f['errors']}" for r in runs
            for p, f in r["phases"].items() if f["ok"] < f["requests"]]
    return out


def run(cfg: PeerConfig, log: Callable[[str], None] = print, progress: Reporter = silent) -> dict:
    """The whole benchmark; one JSON-able report."""
    runs: list[dict] = []
    build = None
    with tempfile.TemporaryDirectory(prefix="deltafleet-peer-") as tmp:
        w, differs = prepare(cfg, Path(tmp), log)
        for dtype in cfg.dtypes:
            runs.append(run_deltafleet(cfg, w, dtype, log))
        if not cfg.skip_llamacpp:
            build = ensure_server(jobs=cfg.build_jobs, progress=progress, log=log)
            for gguf_type in cfg.llama_types:
                runs.append(run_llamacpp(cfg, w, build, gguf_type, log, progress))
    return {
        "config": {**asdict(cfg), "llama_types": list(cfg.llama_types)},
        "cpu": this_cpu(),
        "versions": {**_versions(build.server if build else None),
                     "llama-cpp-python (llama.cpp sources)": LLAMA_CPP_PYTHON_VERSION},
        "workload": {"adapters": f"{cfg.adapters} peft LoRA r16 alpha 32 on q,k,v,o,gate,up,down",
                     "prompt_tokens": cfg.prompt_tokens, "max_tokens": cfg.max_tokens, "clients": cfg.clients,
                     "requests_per_client": cfg.requests_per_client, "temperature": 0, "ignore_eos": True,
                     "stream": True},
        "reference": {"check_tokens": cfg.check_tokens, "cases": len(w.cases),
                      "adapters_change_answer": f"{sum(differs)}/{len(differs)}"},
        "runs": runs,
        "ratios": throughput_ratios(runs),
        "failures": failures(runs),
    }
