"""`deltafleet serve-demo` (what `make demo` runs): three tenants share one SmolLM2 behind the HTTP server.

1. Train two small tenant adapters on the embedded SmolLM2 with `deltafleet.train` (a LoRA on json-field, a RoAd
   on sort; a few dozen steps each), cached under `$DELTAFLEET_CACHE_DIR/demo-adapters` so later runs reuse
   them. The third tenant uses the bare base model.
2. Start the server in this process on 127.0.0.1 (ephemeral port) with a tenancy config: one generated key per
   tenant, each allowed only its own adapter.
3. Send every tenant's requests at once through the official openai client (plus one request for another
   tenant's adapter, which gets the same 404 as a missing model), print a table, and drain the server.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltafleet.adapters.io import peek_config
from deltafleet.bench.serve import free_port
from deltafleet.models.loading import resolve_base
from deltafleet.serve.engine import EngineConfig
from deltafleet.serve.http.app import create_app
from deltafleet.serve.http.engine_gateway import EngineGateway, default_model_name
from deltafleet.serve.http.server import BackgroundServer
from deltafleet.serve.http.tenancy import Tenancy
from deltafleet.store.cache import cache_dir
from deltafleet.store.manifest import read_manifest
from deltafleet.tasks import get_task
from deltafleet.tasks.base import normalize
from deltafleet.train.config import TrainConfig
from deltafleet.train.recipe import train


@dataclass(frozen=True)
class Tenant:
    name: str
    adapter: str | None  # None: the base model
    method: str | None = None
    task: str | None = None
    steps: int = 0
    lr: float | None = None


TENANTS = (
    Tenant("acme", "acme-json", "lora", "json-field", steps=24, lr=2e-3),
    Tenant("globex", "globex-sort", "road", "sort", steps=24, lr=1e-2),
    Tenant("initech", None),
)
BASE_PROMPTS = ("What is the capital of France? Answer in one sentence.", "Name two primary colours.")
PER_TENANT = 2
MAX_TOKENS = 24


def demo_root() -> Path:

    return cache_dir() / "demo-adapters"


def _trained(out: Path, t: Tenant) -> bool:
    try:
        m = read_manifest(out) or {}
    except ValueError:  # a malformed manifest: train again
        return False
    return m.get("completed") is True and m.get("steps") == t.steps and m.get("task") == t.task


def prepare_adapters(base: str, root: Path, console: Console) -> None:
    """Train (or reuse) each tenant's adapter into root/<adapter name>."""
    import shutil


    for t in TENANTS:
        if t.adapter is None:
            continue
        out = root / t.adapter
        if _trained(out, t):
            console.print(f"[dim]{t.adapter}: reusing {out}[/dim]")
            continue
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        console.print(f"training {t.adapter}: {t.method} on {t.task}, {t.steps} steps (once; cached in {root})")
        train(TrainConfig(base=base, task=t.task, method=t.method, out=out, steps=t.steps, batch_size=4,
                          lr=t.lr, eval_examples=0, save_every=t.steps), console=console)
        console.print(f"[dim]{t.adapter} trained in {time.perf_counter() - t0:.0f} s[/dim]")


def requests_for(t: Tenant, seed: int = 0) -> list[tuple[str, str | None]]:
    """(prompt, expected answer or None) pairs from the test split of the tenant's task."""
    if t.task is None:
        return [(p, None) for p in BASE_PROMPTS[:PER_TENANT]]

    return [(e.prompt, e.answer) for e in get_task(t.task).examples("test", n=PER_TENANT, seed=seed)]


async def _ask(url: str, key: str, model: str, prompt: str) -> tuple[str, int, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    t0 = time.perf_counter()
    try:
        r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=MAX_TOKENS, temperature=0)
    except openai.APIStatusError as e:
        return f"HTTP {e.status_code}: {e.body.get('message') if isinstance(e.body, dict) else e}", 0, \
            time.perf_counter() - t0
    finally:
        await client.close()
    return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - t0


def _short(text: str, n: int) -> str:
    """One line, at most n characters (the middle elided): prompts end with the part that matters."""
    text = " ".join(text.split())
    return text if len(text) <= n else f"{text[:n // 2 - 2]} ... {text[-(n // 2 - 3):]}"


def run_demo(base: str, dtype: str, console: Console, replicas: int = 0) -> None:
    """`replicas` > 0: serve through the Ray Serve application (`deltafleet serve --ray`) with that many engine
    replicas instead of the single-process server."""

    root = demo_root()
    root.mkdir(parents=True, exist_ok=True)
    prepare_adapters(base, root, console)

    keys = {t.name: f"sk-{t.name}-{secrets.token_urlsafe(12)}" for t in TENANTS}
    tenancy_dict = {"tenants": [{"name": t.name, "api_key": keys[t.name], "adapters": [t.adapter] if t.adapter else []}
                                for t in TENANTS]}
    tenancy = Tenancy.from_dict(tenancy_dict)
    t0 = time.perf_counter()
    model_name = "smollm2-135m" if base == "smollm2-135m" else default_model_name(base)
    if replicas:  # Ray is imported only here: the single-process demo runs without it
        from deltafleet.serve.cluster.app import ClusterConfig
        from deltafleet.serve.cluster.launch import start
        from deltafleet.serve.cluster.replica import ClusterSpec

        spec = ClusterSpec(str(resolve_base(base)), str(root), model_name,
                           tuple(dict(dtype=dtype, max_batch=8, max_model_len=512).items()))
        launched = start(ClusterConfig(spec, replicas=replicas, tenancy=tenancy_dict), port=free_port())
        url, stop = launched.url, launched.stop
        where = f"Ray Serve ingress on {url}: {replicas} engine replicas of"
    else:
        gateway = EngineGateway.from_pretrained(base, root, EngineConfig(dtype=dtype, max_batch=8, max_model_len=512),
                                                model_name)
        server = BackgroundServer(create_app(gateway, tenancy), gateway).start()
        url, stop = server.url, server.stop
        where = f"server on {url}:"
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    console.print(f"{where} {model_name} ({dtype}) + adapters {', '.join(names)}, loaded in "
                  f"{time.perf_counter() - t0:.1f} s; one API key per tenant")

    jobs = []
    for t in TENANTS:
        for prompt, expected in requests_for(t):
            jobs.append((t, t.adapter or model_name, prompt, expected))
    intruder = TENANTS[-1]  # initech tries acme's adapter: 404, as for a model that does not exist
    jobs.append((intruder, TENANTS[0].adapter, requests_for(TENANTS[0])[0][0], None))

    async def all_at_once():
        return await asyncio.gather(*(_ask(url, keys[t.name], model, prompt) for t, model, prompt, _ in jobs))

    t1 = time.perf_counter()
    answers = asyncio.run(all_at_once())
    wall = time.perf_counter() - t1
    kinds = {n: peek_config(root / n).kind for n in names}

    total = sum(tokens for _, tokens, _ in answers)
    table = Table(title=f"{len(jobs)} concurrent chat requests, 3 tenants, one base model: {total} tokens in "
                        f"{wall:.1f} s ({total / wall:.1f} tokens/s in all)")
    for col in ("tenant", "model", "kind", "prompt", "answer", "ok", "latency", "tok/s"):
        table.add_column(col, justify="right" if col in ("latency", "tok/s") else "left",
                         overflow="fold", max_width={"prompt": 56, "answer": 40, "ok": 24}.get(col))
    for (t, model, prompt, expected), (answer, tokens, latency) in zip(jobs, answers, strict=True):
        ok = "" if expected is None else ("[green]yes[/green]" if normalize(answer) == normalize(expected)
                                          else f"[red]no[/red] ({expected})")
        kind = "base" if model == model_name else kinds.get(model, "-")
        table.add_row(t.name, model, kind, _short(prompt, 90), _short(answer, 80), ok, f"{latency:.1f} s",
                      f"{tokens / latency:.1f}" if tokens else "-")
    console.print(table)
    t2 = time.perf_counter()
    stop()
    console.print(f"server drained and stopped in {time.perf_counter() - t2:.1f} s")
