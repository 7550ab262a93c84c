"""The workload of `deltafleet bench peer`: adapters, prompts, request bodies, and the greedy reference.

Adapters: `n` peft-format LoRAs (r16, alpha 32, all seven projections). A and B are random (deltafleet's LoRA init)
and B is then rescaled per module so that the delta's RMS is `REL_DELTA` times the base weight's RMS, the size of a
trained LoRA's delta rather than the init's (which is about as large as the weight itself). deltafleet serves the
peft directories; llama.cpp gets the same directories converted to GGUF.

Prompts: `PROMPT_TOKENS` token ids each, starting with a tag unique to (phase, index), so no two requests share
more than a token of prefix; both servers get the same ids (no tokenization on either side).

Reference: transformers (AutoModelForCausalLM, fp32) + peft (PeftModel on the adapter directories), greedy, EOS
ignored: plain argmax over a full forward per token. Agreement with a server is the number of leading tokens equal.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32.0
REL_DELTA = 0.2
PROMPT_TOKENS = 41
FILLER = (" The following is a short report about the weather, the markets and the news of the day in a small town"
          " by the sea, written for readers who like plain words, clear numbers and a little local history.")
BASE_MODEL = "base"  # deltafleet's public name of the base (`serve --model-name base`)


def adapter_name(k: int) -> str:
    return f"lora{k}"


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def rescale_lora_b(A: torch.Tensor, B: torch.Tensor, scaling: float, weight_rms: float, rel: float) -> torch.Tensor:
    """B scaled so that rms(scaling * B @ A) = rel * weight_rms. A: (R, in), B: (out, R).

    ||B A||_F^2 = sum((B^T B) * (A A^T)): two (R, R) Gram matrices instead of the (out, in) delta."""
    A64, B64 = A.double(), B.double()
    delta_rms = scaling * float(((B64.T @ B64) * (A64 @ A64.T)).sum() / (B.shape[0] * A.shape[1])) ** 0.5
    return (B64 * (rel * weight_rms / delta_rms)).to(B.dtype)


def make_lora_adapters(hf_dir: Path, out: Path, n: int, seed: int = 0, rel: float = REL_DELTA) -> list[str]:
    """`n` peft LoRA directories `out/lora{k}` for the base checkpoint `hf_dir`; returns their names."""
    from deltafleet.adapters import Adapter, LoraConfig, random_adapter, save_adapter
    from deltafleet.models.config import ModelConfig
    from deltafleet.models.loading import read_checkpoint_tensors

    cfg = ModelConfig.from_file(hf_dir / "config.json")
    tensors, _ = read_checkpoint_tensors(hf_dir)
    lcfg = LoraConfig(r=RANK, alpha=ALPHA, targets=ALL7)
    weight_rms = {}
    for layer in range(cfg.num_layers):
        for proj in ALL7:
            group = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            weight_rms[(layer, proj)] = rms(tensors[f"model.layers.{layer}.{group}.{proj}.weight"])
    names = []
    for k in range(n):
        raw = random_adapter(cfg, lcfg, seed=seed + k)
        params = {key: {"A": p["A"], "B": rescale_lora_b(p["A"], p["B"], lcfg.scaling, weight_rms[key], rel)}
                  for key, p in raw.params.items()}
        save_adapter(Adapter(lcfg, params), out / adapter_name(k), model_cfg=cfg)
        names.append(adapter_name(k))
    return names


def prompt_tag(phase: str, index: int) -> str:
    """8 hex digits unique to (phase, index): different from the first token on."""
    return hashlib.sha256(f"{phase}/{index}".encode()).hexdigest()[:8]


def make_prompt(encode: Callable[[str], list[int]], tag: str, length: int = PROMPT_TOKENS) -> list[int]:
    """`length` token ids: `[tag]` then filler text, cut to length."""
    ids = encode(f"[{tag}]" + FILLER)
    while len(ids) < length:
        ids += encode(FILLER)
    return ids[:length]


def phase_prompts(encode: Callable[[str], list[int]], phase: str, n: int,
                  length: int = PROMPT_TOKENS) -> list[list[int]]:
    return [make_prompt(encode, prompt_tag(phase, i), length) for i in range(n)]


def deltafleet_body(prompt: list[int], adapter: int | None, max_tokens: int, stream: bool = True) -> dict:
    """deltafleet's /v1/completions: the adapter is the `model`."""
    body = {"model": BASE_MODEL if adapter is None else adapter_name(adapter), "prompt": prompt,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def llamacpp_body(prompt: list[int], adapter: int | None, max_tokens: int, stream: bool = True) -> dict:
    """llama-server's /v1/completions: the adapter is a per-request `lora` list (ids not listed get scale 0); a
    base request carries none and gets the server's global scales, which the harness sets to 0."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            "cache_prompt": False}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if adapter is not None:
        body["lora"] = [{"id": adapter, "scale": 1.0}]
    return body


BODIES: dict[str, Callable[[list[int], int | None, int, bool], dict]] = {
    "deltafleet": deltafleet_body, "llama.cpp": llamacpp_body}


def phase_plan(prompts: Sequence[list[int]], n: int, adapters: int | None, max_tokens: int,
               body: Callable[..., dict]) -> list[dict]:
    """The bodies of a phase's `n` requests, in the order the clients take them: request g gets prompts[g] and, with
    `adapters`, adapter g % adapters (round-robin), else the base."""
    if len(prompts) < n:
        raise ValueError(f"{len(prompts)} prompts for {n} requests: need one each")
    return [body(prompts[g], None if adapters is None else g % adapters, max_tokens) for g in range(n)]


def agreeing_tokens(reference: Sequence[int], got: Sequence[int]) -> int:
    """Leading tokens equal."""
    n = 0
    for a, b in zip(reference, got, strict=False):
        if a != b:
            break
        n += 1
    return n


def agreeing_tokens_text(reference: Sequence[int], text: str, decode: Callable[[Sequence[int]], str]) -> int:
    """Leading reference tokens whose decoded text `text` starts with (for a server that returns text only). A prefix
    that ends inside a character (U+FFFD) decides nothing; the next token's prefix does."""
    agreed = 0
    for k in range(1, len(reference) + 1):
        p = decode(reference[:k])
        if p.endswith("\ufffd"):
            continue
        if not text.startswith(p):
            break
        agreed = k
    return agreed


@torch.no_grad()
def reference_greedy(hf_dir: Path, adapters_dir: Path, cases: Sequence[tuple[list[int], str | None]],
                     n_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy continuations of each (prompt ids, adapter name or None for the base), transformers + peft in fp32,
    with the margin (top-1 minus top-2 logit) of every chosen token: a server in lower precision may pick the
    other one of a near tie."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise RuntimeError("the correctness reference needs peft: pip install -e '.[peer]'") from e
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    names = sorted({a for _, a in cases if a is not None})
    if names:
        with warnings.catch_warnings():  # peft 0.21 calls a transformers method that warns of its v6 rename
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapters_dir / names[0]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(adapters_dir / name), adapter_name=name)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model on ~50 tokens: one thread is fast, and does not stall on a busy CPU
    try:
        for prompt, adapter in cases:
            ids = torch.tensor([prompt])  # (1, T)
            if adapter is None and names:
                with model.disable_adapter():
                    out.append(_greedy(model, ids, n_tokens))
            else:
                if adapter is not None:
                    model.set_adapter(adapter)
                out.append(_greedy(model, ids, n_tokens))
    finally:
        torch.set_num_threads(threads)
    return out


def _greedy(model, ids: torch.Tensor, n_tokens: int) -> tuple[list[int], list[float]]:
    """(tokens, margins): argmax of a full forward, n_tokens times, EOS not special (no KV cache: nothing
    version-dependent, and obviously right). ids: (1, T)."""
    new: list[int] = []
    margins: list[float] = []
    for _ in range(n_tokens):
        top = model(input_ids=ids).logits[0, -1].topk(2)  # values, indices: (2,)
        new.append(int(top.indices[0]))
        margins.append(round(float(top.values[0] - top.values[1]), 4))
        ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return new, margins
