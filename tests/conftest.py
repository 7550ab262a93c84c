"""Shared fixtures: tiny random Llama-family checkpoints built in code, and the embedded SmolLM2 (converted once);
and the one tolerance model every numeric comparison in the suite uses (`tol`, `assert_close`).

Tolerances
----------
Two computations of the same values differ by rounding. A test bounds the largest difference by

    max |actual - expected|  <=  C * u * g(K) * sqrt(D) * scale,        scale = max |expected|

- u = torch.finfo(dtype).eps / 2, the unit roundoff: 2^-24 = 6.0e-8 in fp32, 2^-8 = 3.9e-3 in bf16.
- K, the longest reduction in the operation (a matmul's inner size); D, the number of such operations chained
  (`forward_chain`: a whole forward is the decoder layers plus the LM head). Errors made in different layers are
  independent and add in quadrature, hence sqrt(D).
- scale: a sum's rounding error scales with its terms, not with each result, so the bound is one absolute number
  for every element, relative to the reference's largest (not torch's element-wise rtol, meaningless for results
  near zero). Where the terms are larger than the result (a product that cancels to the identity) the test passes
  their size as `scale`.
- C and g depend on the kind of operation, one of three (`OPS`):

"exact" (bound 0): the same arithmetic in the same order, bit-identical on any CPU: serialization and load, a
  copy into a pool slot, a kernel against a reference running the same ops on the same operands (QuantLinear's
  kernels on one W_hat), F.linear under autograd against F.linear, adding exact zeros (an identity adapter), a
  training run resumed from its checkpoint in the same process.

"reordered" (g = sqrt(K), C = 32): both sides in `dtype`, equal in exact arithmetic, but each K-term sum
  accumulated in another order or through another formula: our model against transformers or peft, merged
  (W + BA) x against unmerged W x + B (A x), oneDNN against MKL, one row count's GEMM kernel against another's, a
  native kernel against its torch reference. A random-order sum of K terms is off by ~sqrt(K) u relative to its
  result (Higham and Mary 2019, "A new approach to probabilistic rounding error analysis"; K u at worst).
  C = 2 x 4 x 4: two computations, each off the exact result (|a - b| <= |a - x| + |b - x|); the largest of ~1e4
  compared elements of a roughly normal error sits at ~4 sigma (sqrt(2 ln 1e4) = 4.3); errors in activations
  larger than the compared output are amplified on the way (a strong adapter drives attention scores to ~100
  before the softmax and the residual stream to ~3e3 before RMSNorm). Calibrated against fp64 forwards of the
  tiny models: one fp32 side is off by at most 7.8 u sqrt(K) sqrt(D) max|logits| (LoRA r=4 with doubled factors,
  merged), 0.7 without an adapter, 0.1 for SmolLM2; two sides, 2 x 7.8 = 16 < 32. The Intel Xeon's 4.6e-5 on
  that merged LoRA is 8.5 of these units.
  This is what differs between CPUs: MKL and oneDNN pick kernels (AVX-512 on the AMD EPYC, AVX-512 or AMX on the
  Intel Xeon), blockings and thread splits per machine and per thread count, so no fp32 comparison of two code
  paths may assume bit equality. fp32 matmuls must stay IEEE fp32: `set_float32_matmul_precision("highest")`
  below ("medium" lets oneDNN run them in bf16 on AMX).

"rounded" (g = 1, C = 16): values rounded to a low-precision `dtype` on one side and not the other, or at other
  points: bf16 compute (8-bit significand) against an fp32 reference, or both in bf16 through different kernels.
  Operands and results are rounded to u while products accumulate in fp32 (oneDNN, AMX and the native kernels
  alike), so each chained op adds a few u whatever K; the fp32 side's own error is 1e-4 of that, and AMX or
  AVX-512 accumulation orders only move bf16 results across rounding boundaries, errors of the same kind.
  C = 1 x 4 x 4 (one side, 4 sigma, amplification); measured in bf16: at most 6.0 u sqrt(D) max|logits| (the
  same kind of strong LoRA), 1.6 without an adapter.

For the tiny configs (K = 256, 2 decoder layers + LM head, logits of max ~3.5) this gives 32 * 6.0e-8 * 16 *
sqrt(3) * 3.5 = 1.9e-4 in fp32 and 16 * 3.9e-3 * sqrt(3) * 3.5 = 0.38 in bf16. A dropped adapter term or a wrong
scale moves fp32 logits by more than 1e-2, ~50 times the fp32 bound; fp32 tests that compare adapted outputs
also check that the adapter moves them by more than 1e-2 (or 1e-3), above their bound.

Not bounded here, because not rounding: a quantizer's or compressor's own error, which those tests derive from
its step size or budget. References are computed in fp32.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@contextlib.contextmanager
def one_thread():
    """One intra-op thread (tests of many tiny ops on a shared 2-core CPU), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


torch.set_float32_matmul_precision("highest")  # fp32 tolerances assume IEEE fp32 matmuls (see above)


class Op(NamedTuple):
    c: float  # C: how many u * g(K) * sqrt(D) of max|expected| each compared element may be off
    growth: Callable[[int], float]  # g(K)


OPS = {
    "exact": Op(0.0, lambda k: 0.0),
    "reordered": Op(32.0, math.sqrt),  # sums of K terms in another order, in the compared dtype
    "rounded": Op(16.0, lambda k: 1.0),  # low-precision operands and results, fp32 accumulation
}


def tol(op: str, dtype: torch.dtype = torch.float32, *, k: int = 1, depth: int = 1) -> float:
    """The bound on max |actual - expected| relative to max |expected| (0 for "exact"), per the model above."""
    if op not in OPS:
        raise ValueError(f"op={op!r}: must be one of {sorted(OPS)}")
    u = torch.finfo(dtype).eps / 2
    return OPS[op].c * u * OPS[op].growth(k) * math.sqrt(depth)


def forward_chain(cfg) -> dict[str, int]:
    """k and depth of a whole forward of a model with config `cfg` (our ModelConfig)."""
    return {"k": max(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim),
            "depth": cfg.num_layers + 1}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, op: str, dtype: torch.dtype | None = None, *,
                 k: int = 1, depth: int = 1, scale: float | None = None, msg: str = "") -> None:
    """`torch.testing.assert_close` with the bound `tol(op, dtype, k=k, depth=depth) * scale` as atol (dtype
    defaults to expected's, scale to max |expected|); a failure reports max |diff|, the bound and its derivation."""
    label = f"{msg}: " if msg else ""
    if op == "exact":
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=lambda m: f"{label}exact\n{m}")
        return
    dtype = expected.dtype if dtype is None else dtype
    rel = tol(op, dtype, k=k, depth=depth)
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    bound = rel * scale
    how = f"{op}: C={OPS[op].c:g} x u({dtype}) x g(K={k}) x sqrt(D={depth}) = {rel:.3g}, x scale {scale:.3g}"

    def report(m: str) -> str:
        diff = float((actual.detach().double() - expected.detach().double()).abs().max())
        return f"{label}max|diff| {diff:.3g} > bound {bound:.3g} ({how})\n{m}"

    torch.testing.assert_close(actual, expected, atol=bound, rtol=0, msg=report)


def nll_tol(cfg) -> float:
    """The bound on a summed NLL, relative, when the logits it is computed from are within a forward's "reordered"
    bound (and on ln(perplexity), the mean NLL): each -log p moves by at most 2 max|d logits|, under the bound times
    -log p itself while max|logits| < -log p / 2 (the random tiny models: logits of max ~4, -log p ~ ln V ~ 10)."""
    return tol("reordered", **forward_chain(cfg))


# Out sizes are multiples of 64 so peft's RoAd (group_size 64) fits every projection.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=320, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=False),
    "llama3-rope-tied": dict(model_type="llama", hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=300, rms_norm_eps=1e-6,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}),
    "qwen2-bias": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320, rms_norm_eps=1e-6,
                       max_position_embeddings=256, tie_word_embeddings=False),
}


def build_hf_model(name: str, seed: int = 0):
    """A transformers model with deterministic random weights (biases and norms non-trivial too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> checkpoint directory (config.json + model.safetensors) for each tiny config."""
    out = {}
    for name in TINY_CONFIGS:
        d = tmp_path_factory.mktemp(name)
        build_hf_model(name).save_pretrained(str(d), safe_serialization=True)
        out[name] = d
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2 checkpoint (converted from the GGUF once per cache directory)."""
    from deltafleet.models.loading import resolve_base

    return resolve_base("smollm2-135m")


def token_batch(vocab: int, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)
