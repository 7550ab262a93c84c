"""MEFT: reversible fine-tuning of a pretrained Llama (Liao, Tan and Monz, "Make Pre-trained Model Reversible: From
Parameter to Memory Efficient Fine-Tuning", NeurIPS 2023, arXiv 2306.00477, sec. 3 and 4; reference code
github.com/BaohaoLiao/mefts `models/modeling_revbert.py`).

Shapes: B batch, T tokens, H hidden, R adapter bottleneck (`meft_bottleneck`), L decoder layers.

The two-stream network
----------------------
The embedding output h0 (B, T, H) is duplicated, [x1; x2] = [h0; h0]. Every decoder layer becomes a reversible
coupling

    y1 = lam * x1 + F(x2)          inverse:  x2 = (y2 - G(y1)) / beta
    y2 = beta * x2 + G(y1)                   x1 = (y1 - F(x2)) / lam

whose output is [y2; y1] (the streams swap: MEFT1, MEFT2) or [y1; y2] (MEFT3). After the last layer the hidden
state is the stream x2 (the paper averages (x1 + x2) / 2; see "At initialisation" below for why we read x2), then
Llama's final RMSNorm and LM head. Layers at or above `meft_rev_layers` run the same
coupling with ordinary autograd (the reference's `num_rev_layers`: its upper layers are coupling layers too, fed
the two streams, and the readout is taken only at the very end), so `meft_rev_layers` changes the memory, never the
function.

Llama's pieces. For decoder layer l with adapters a_f, a_g, all residual-free updates of a (B, T, H) stream:

    attn(x)       = o_proj(self_attn(input_layernorm(x)))               the pretrained attention update
    mlp_a(z, a)   = mlp(n) + a(n),  n = post_attention_layernorm(z)     MLP update, adapter in parallel
    a(u)          = up(silu(down(u)))                                  dense(H->R) -> SiLU -> dense(R->H)

The adapter sits in parallel to the MLP, on the MLP's normalised input, as the reference adds `ffn_adapter` to the
FFN output inside the layer (`RevBertOutput`). The MEFT3 attention adapter reads the attention update and adds to it
(the reference's `attn_adapter` on the self-output, sequential). A stand-alone adapter (G of MEFT1, F of MEFT2, the
reference's `rev_adapter`) reads its stream through a parameter-free RMS normalisation, rms(u) =
u / sqrt(mean(u^2) + eps): a pre-LN residual stream grows with depth (and holds outlier channels), and this keeps
the adapter's effect independent of that scale (the reference has an optional LayerNorm there). SiLU is Llama's
`hidden_act` (the reference uses the model's `hidden_act`). Both dense layers have biases; weights are drawn
N(0, 0.02^2), biases are 0, as the reference initialises linear layers. No dropout (Llama uses none), so the
backward recomputation needs no RNG state.

    variant  lam  beta  swap  F(x2)                                    G(y1)
    meft1    0.1  1     yes   x2 + attn(x2) + mlp_a(., a_f) - lam x2    a_g(rms(y1))
                              (the decoder layer with a_f, minus lam x2)
    meft2    1    0.1   yes   a_f(rms(x2))                             the decoder layer with a_g, minus beta y1
    meft3    0.1  0.1   no    (1 - lam) x2 + u + a_f(u), u = attn(x2)   (1 - beta) y1 + mlp_a(y1, a_g)

The choice: where the pretrained residual goes. BERT (the paper's model) is post-LN: a layer's output is a
LayerNorm, so the lam x1 / beta x2 terms are a 10% perturbation renormalised at every layer. A pre-LN Llama
layer's output is x + (updates), the residual stream itself. Used literally (F = layer), MEFT1's current stream
follows h'_{n+1} = layer(h'_n) + lam h'_{n-1}, whose growth factor solves r^2 = r + lam (r = 1.09 per layer:
x13 over SmolLM2's 30 layers; MEFT3's literal form grows by about 1 + lam + beta = 1.2 per layer), so each
pretrained update is drowned by the accumulated past states. We therefore subtract lam x2 (beta y1) from the
block that carries the residual, i.e. the identity path is split between the streams:

    meft1:  y1 = layer(x2) + lam (x1 - x2)
    meft3:  y1 = x2 + attn(x2) + lam (x1 - x2),   y2 = y1 + mlp(y1) + beta (x2 - y1)

F still depends on x2 only (G on y1 only), so the coupling stays exactly invertible with the same lam, beta. At
initialisation (adapters ~ 0), with the pretrained states h_n (and z_n = h_n + attn_n the mid-layer state):
- meft1: stream 2 carries h_n, stream 1 lags one layer (x1 = h_{n-1}, since G ~ 0 and beta = 1); the first layer
  is exact (x1 = x2 = h0) and each later one is off by lam (h_{n-1} - h_n), lam times one layer's update
  (recurrence r^2 = (1 - lam) r + lam: r = 1 or -lam, stable).
- meft2: the mirror image (F ~ 0 and lam = 1: y1 = x1 carries h_n, y2 = layer(y1) + beta (x2 - y1)).
- meft3: stream 2 carries h_n, stream 1 the mid-layer state z_{n-1}; y1 is off by lam times the previous MLP
  update, y2 by beta times this layer's attention update.
The final average is (h_L + h_{L-1}) / 2 for meft1/2 and (h_L + z_L) / 2 for meft3, as the paper specifies:
half of the last layer's (meft3: last MLP's) update is lost at initialisation; the adapters must learn it back.
Measured on SmolLM2-135M (48 random tokens, adapters zeroed), KL(pretrained || MEFT) of the next-token
distributions: meft1/2 1.62 nats, meft3 1.38 with the split residual (literal F = layer: 9.2 and 19.1); reading
the stream that carries h_L (x2, for every variant) instead of the average gives 0.09 / 0.12. We read x2: the
paper's premise is that the network starts where the pretrained one is, and on a residual-stream decoder the
average does not (a deviation from the paper, chosen by these figures).

Memory. `_ReversibleStack` is one autograd Function over the lowest `meft_rev_layers` layers: its forward runs
the couplings under no_grad and saves only the two output streams (2 B T H); its backward walks the layers top
down, reconstructs each layer's inputs with the inverse above, recomputes G then F under enable_grad, and
backpropagates through them (the RevNet scheme, Gomez et al. 2017). The reconstruction divides by lam and beta
(0.1), so rounding errors grow by 1 / (lam beta) per reversible layer: 10x for meft1/2, 100x for meft3, and from
a larger start in bf16, where F and G are recomputed on inputs that round differently (`tests/train/test_meft.py`
measures it). On SmolLM2-135M in fp32 the relative reconstruction error after k layers was 6e-5 (k = 4), 0.7
(k = 8) for meft1; 5e-3 (k = 3), 0.5 (k = 4) for meft3; in bf16 about 10x (meft3: 100x) more. With all 30 layers
reversible the reconstructed activations, and so the gradients, are meaningless: keep `meft_rev_layers` to about
4 (meft1/2) or 2 (meft3) in fp32, fewer in bf16. bf16 autocast is restored for the
recomputation (`torch.amp.custom_fwd`/`custom_bwd`). Rotary embeddings and the causal mask are computed once per
forward as transformers' `LlamaModel.forward` does and shared by all layers. With a KV cache (generation) or
without grad the plain coupling runs (nothing is saved under no_grad; each layer's attention runs once per
forward, so the cache is filled as usual).

Artifact. `adapter_model.safetensors` holds the adapters, `layers.{l}.{f|g}.{down|up}.{weight|bias}`, and the
settings in its `__metadata__` (the file is self-describing: `load_meft` reads them there); `deltafleet.json`
(format `deltafleet-meft`) repeats them with the sizes. A MEFT tenant changes the network's structure (two
streams, a different layer function), so the serving engine cannot batch it with ordinary adapters on a shared
base: it is evaluated on its own transformers model (`load_meft`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.errors import ArtifactError
from deltafleet.store.manifest import write_manifest
from deltafleet.store.safetensors_io import check_finite, load_tensors, read_metadata, save_tensors
from deltafleet.train.registry import Method, register_method

if TYPE_CHECKING:
    from deltafleet.train.config import TrainConfig

ADAPTER_FILE = "adapter_model.safetensors"
FORMAT = "deltafleet-meft"
INIT_STD = 0.02


@dataclass(frozen=True)
class MeftConfig:
    """variant: a key of VARIANTS; rev_layers: the lowest k of num_layers layers use the reversible backward."""

    variant: str
    num_layers: int
    hidden: int
    bottleneck: int = 8
    rev_layers: int | None = None  # None: all layers

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}: must be one of {sorted(VARIANTS)}")
        for name in ("num_layers", "hidden", "bottleneck"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        if self.rev_layers is None:
            object.__setattr__(self, "rev_layers", self.num_layers)
        r = self.rev_layers
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= self.num_layers:
            raise ValueError(f"rev_layers={r!r}: must be an integer in [0, num_layers={self.num_layers}]")

    @property
    def coefficients(self) -> Variant:
        return VARIANTS[self.variant]

    def metadata(self) -> dict[str, str]:
        v = self.coefficients
        return {"kind": "meft", "variant": self.variant, "lambda": repr(v.lam), "beta": repr(v.beta),
                "num_layers": str(self.num_layers), "hidden": str(self.hidden), "bottleneck": str(self.bottleneck),
                "rev_layers": str(self.rev_layers), "activation": "silu"}


# ----------------------------------------------------------------------------------------------- pure math
def adapter(u: Tensor, p: Adapter) -> Tensor:
    """(..., H) -> (..., H): up(silu(down(u)))."""
    return F.linear(F.silu(F.linear(u, p.down.weight, p.down.bias)), p.up.weight, p.up.bias)


def rms(u: Tensor, eps: float) -> Tensor:
    """Parameter-free RMS normalisation over the last dim, computed in fp32, returned in u's dtype."""
    v = u.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(u.dtype)


class Context(NamedTuple):
    """What every layer reads, computed once per forward: the mask and rotary tables as LlamaModel builds them."""

    mask: Any  # create_causal_mask's result (a tensor, a BlockMask or None)
    rope: tuple[Tensor, Tensor]  # cos, sin (B or 1, T, head_dim)
    position_ids: Tensor  # (B or 1, T)
    cache: Any = None  # a transformers Cache while generating; None in training
    eps: float = 1e-6


def attn_update(layer, x: Tensor, c: Context) -> Tensor:
    """(B, T, H) -> (B, T, H): o_proj(attention(input_layernorm(x))), no residual."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=c.rope,
                             attention_mask=c.mask, position_ids=c.position_ids, cache=c.cache)
    return out


def mlp_update(layer, z: Tensor, a: Adapter) -> Tensor:
    """(B, T, H) -> (B, T, H): mlp(n) + a(n), n = post_attention_layernorm(z), no residual."""
    n = layer.post_attention_layernorm(z)
    return layer.mlp(n) + adapter(n, a)


def layer_with_adapter(layer, x: Tensor, a: Adapter, c: Context) -> Tensor:
    """The pretrained decoder layer with `a` parallel to its MLP: z = x + attn(x); z + mlp_a(z)."""
    z = x + attn_update(layer, x, c)
    return z + mlp_update(layer, z, a)


def _meft1_f(v: Variant, layer, block: MeftBlock, x2: Tensor, c: Context) -> Tensor:
    return layer_with_adapter(layer, x2, block.f, c) - v.lam * x2


def _meft1_g(v: Variant, layer, block: MeftBlock, y1: Tensor, c: Context) -> Tensor:
    return adapter(rms(y1, c.eps), block.g)


def _meft2_f(v: Variant, layer, block: MeftBlock, x2: Tensor, c: Context) -> Tensor:
    return adapter(rms(x2, c.eps), block.f)


def _meft2_g(v: Variant, layer, block: MeftBlock, y1: Tensor, c: Context) -> Tensor:
    return layer_with_adapter(layer, y1, block.g, c) - v.beta * y1


def _meft3_f(v: Variant, layer, block: MeftBlock, x2: Tensor, c: Context) -> Tensor:
    u = attn_update(layer, x2, c)
    return (1 - v.lam) * x2 + u + adapter(u, block.f)


def _meft3_g(v: Variant, layer, block: MeftBlock, y1: Tensor, c: Context) -> Tensor:
    return (1 - v.beta) * y1 + mlp_update(layer, y1, block.g)


class Variant(NamedTuple):
    """The coupling's constants and its F, G (each (variant, layer, block, stream (B, T, H), context) -> (B, T, H)),
    per the module docstring's table."""

    lam: float  # the coefficient of x1 in y1
    beta: float  # the coefficient of x2 in y2
    swap: bool  # output [y2; y1] (True) or [y1; y2]
    f: Callable[..., Tensor]
    g: Callable[..., Tensor]


VARIANTS: dict[str, Variant] = {
    "meft1": Variant(0.1, 1.0, True, _meft1_f, _meft1_g),
    "meft2": Variant(1.0, 0.1, True, _meft2_f, _meft2_g),
    "meft3": Variant(0.1, 0.1, False, _meft3_f, _meft3_g),
}


def coupling(variant: str, layer, block: MeftBlock, x1: Tensor, x2: Tensor, c: Context) -> tuple[Tensor, Tensor]:
    """One reversible layer: streams (x1, x2) -> (y2, y1) when the variant swaps, else (y1, y2); each (B, T, H)."""
    v = VARIANTS[variant]
    y1 = v.lam * x1 + v.f(v, layer, block, x2, c)
    y2 = v.beta * x2 + v.g(v, layer, block, y1, c)
    return (y2, y1) if v.swap else (y1, y2)


def coupling_inverse(variant: str, layer, block: MeftBlock, o1: Tensor, o2: Tensor,
                     c: Context) -> tuple[Tensor, Tensor]:
    """The inputs (x1, x2) of `coupling` from its outputs (o1, o2), by the inverse in the module docstring."""
    v = VARIANTS[variant]
    y1, y2 = (o2, o1) if v.swap else (o1, o2)
    x2 = (y2 - v.g(v, layer, block, y1, c)) / v.beta
    x1 = (y1 - v.f(v, layer, block, x2, c)) / v.lam
    return x1, x2


# ----------------------------------------------------------------------------------------------- parameters
class Adapter(nn.Module):
    """dense(H->R) -> SiLU -> dense(R->H); weights N(0, 0.02^2), biases 0."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        with torch.no_grad():
            for lin in (self.down, self.up):
                lin.weight.normal_(0.0, INIT_STD)
                lin.bias.zero_()


class MeftBlock(nn.Module):
    """The two adapters of one decoder layer: `f` inside F, `g` inside G."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.f = Adapter(hidden, bottleneck)
        self.g = Adapter(hidden, bottleneck)


class MeftAdapters(nn.Module):
    """All trained weights of a MEFT tenant; its state_dict is the exported file (`layers.{l}.{f|g}.{down|up}.*`)."""

    def __init__(self, config: MeftConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MeftBlock(config.hidden, config.bottleneck) for _ in range(config.num_layers))


# ----------------------------------------------------------------------------------------------- reversible stack
class _Stack(NamedTuple):
    variant: str
    layers: list  # the HF decoder layers
    blocks: list  # their MeftBlocks
    context: Context
    params: tuple[Tensor, ...]  # the trainable parameters of these layers, in `apply`'s order


class _ReversibleStack(torch.autograd.Function):
    """(x1, x2) (B, T, H) each -> the streams after `stack.layers`, saving only those two outputs."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x1: Tensor, x2: Tensor, stack: _Stack, *params: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            for layer, block in zip(stack.layers, stack.blocks, strict=True):
                x1, x2 = coupling(stack.variant, layer, block, x1, x2, stack.context)
        ctx.stack = stack
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, d_o1: Tensor, d_o2: Tensor):
        stack: _Stack = ctx.stack
        v = VARIANTS[stack.variant]
        o1, o2 = ctx.saved_tensors
        grads: list[Tensor | None] = [None] * len(stack.params)

        def vjp(out: Tensor, inp: Tensor, d_out: Tensor) -> Tensor:
            """d_out^T d out / d inp; accumulates the parameters' share into `grads`."""
            got = torch.autograd.grad(out, (inp, *stack.params), d_out.to(out.dtype), allow_unused=True)
            for i, g in enumerate(got[1:]):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
            return got[0]

        for layer, block in zip(reversed(stack.layers), reversed(stack.blocks), strict=True):
            (y1, y2), (dy1, dy2) = ((o2, o1), (d_o2, d_o1)) if v.swap else ((o1, o2), (d_o1, d_o2))
            with torch.enable_grad():
                y1r = y1.detach().requires_grad_(True)
                g = v.g(v, layer, block, y1r, stack.context)
                dy1 = dy1 + vjp(g, y1r, dy2)  # total dL/dy1: direct, and through y2 = beta x2 + G(y1)
            x2 = (y2 - g.detach()) / v.beta
            del g, y1r
            with torch.enable_grad():
                x2r = x2.requires_grad_(True)
                f = v.f(v, layer, block, x2r, stack.context)
                dx2 = v.beta * dy2 + vjp(f, x2r, dy1)
            x1 = (y1 - f.detach()) / v.lam
            dx1 = v.lam * dy1
            del f
            o1, o2, d_o1, d_o2 = x1, x2.detach(), dx1, dx2
        return (d_o1, d_o2, None, *grads)


def run_layers(variant: str, layers, blocks, x1: Tensor, x2: Tensor, c: Context, reversible: bool
               ) -> tuple[Tensor, Tensor]:
    """The couplings of `layers` in order; `reversible`: through `_ReversibleStack` (same values, less memory)."""
    if reversible and layers:
        params = tuple(p for b, lay in zip(blocks, layers, strict=True)
                       for p in (*b.parameters(), *lay.parameters()) if p.requires_grad)
        if params or x1.requires_grad or x2.requires_grad:
            return _ReversibleStack.apply(x1, x2, _Stack(variant, list(layers), list(blocks), c, params), *params)
    for layer, block in zip(layers, blocks, strict=True):
        x1, x2 = coupling(variant, layer, block, x1, x2, c)
    return x1, x2


# ----------------------------------------------------------------------------------------------- the model
def _meft_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                  use_cache=None, **kwargs):
    """Replaces `LlamaModel.forward` (bound to the LlamaModel): embeddings, mask, rotary and cache as there, then
    h0 -> [h0; h0] -> couplings -> x2 -> norm. Returns BaseModelOutputWithPast."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)  # (B, T, H)
    if use_cache is None:
        use_cache = self.config.use_cache and not self.training
    if use_cache and cache is None:
        cache = DynamicCache(config=self.config)
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
    mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              cache=cache, position_ids=position_ids)
    c = Context(mask, self.rotary_emb(inputs_embeds, position_ids=position_ids), position_ids, cache,
                self.config.rms_norm_eps)
    meft: MeftAdapters = self.meft
    cfg = meft.config
    layers, blocks, k = list(self.layers[: cfg.num_layers]), list(meft.layers), cfg.rev_layers
    reversible = torch.is_grad_enabled() and cache is None
    x1, x2 = run_layers(cfg.variant, layers[:k], blocks[:k], inputs_embeds, inputs_embeds, c, reversible)
    x1, x2 = run_layers(cfg.variant, layers[k:], blocks[k:], x1, x2, c, False)
    return BaseModelOutputWithPast(last_hidden_state=self.norm(x2), cache=cache)


def apply_meft(causal_lm, config: MeftConfig) -> MeftAdapters:
    """Make a transformers LlamaForCausalLM a MEFT network in place: attach fresh adapters as
    `causal_lm.model.meft`, replace `causal_lm.model.forward`, freeze every other weight. Returns the adapters."""
    model = causal_lm.model
    n, h = model.config.num_hidden_layers, model.config.hidden_size
    if (config.num_layers, config.hidden) != (n, h):
        raise ValueError(f"MEFT config has {config.num_layers} layers of hidden {config.hidden}; the model has "
                         f"{n} of {h}")
    if hasattr(model, "meft"):
        raise ValueError("the model is a MEFT network already")
    for p in causal_lm.parameters():
        p.requires_grad_(False)
    weight = model.embed_tokens.weight
    model.meft = MeftAdapters(config).to(device=weight.device, dtype=weight.dtype)
    model.forward = types.MethodType(_meft_forward, model)
    return model.meft


# ----------------------------------------------------------------------------------------------- the method
def _prepare(causal_lm, cfg: TrainConfig):
    c = causal_lm.config
    rev = None if cfg.meft_rev_layers is None else min(cfg.meft_rev_layers, c.num_hidden_layers)
    apply_meft(causal_lm, MeftConfig(cfg.meft_variant, c.num_hidden_layers, c.hidden_size, cfg.meft_bottleneck, rev))
    return causal_lm


def _export(causal_lm, tokenizer, out: Path) -> str:
    meft: MeftAdapters = causal_lm.model.meft
    tensors = {k: v.detach().float().contiguous() for k, v in meft.state_dict().items()}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, Path(out) / ADAPTER_FILE, metadata=meft.config.metadata())
    cfg, v = meft.config, meft.config.coefficients
    write_manifest(out, FORMAT, {"kind": "meft", "variant": cfg.variant, "lambda": v.lam, "beta": v.beta,
                                 "swap": v.swap, "rev_layers": cfg.rev_layers, "num_layers": cfg.num_layers,
                                 "bottleneck": cfg.bottleneck, "activation": "silu",
                                 "num_params": sum(t.numel() for t in tensors.values()),
                                 "bytes": sum(t.numel() * t.element_size() for t in tensors.values())})
    return FORMAT


def _config_from_metadata(meta: dict[str, str], path: Path) -> MeftConfig:
    def field(name: str) -> str:
        if name not in meta:
            raise ArtifactError(path, f"__metadata__ lacks {name!r} (not a deltafleet MEFT file)")
        return meta[name]

    if field("kind") != "meft":
        raise ArtifactError(path, f"__metadata__ kind={meta['kind']!r}; expected 'meft'")
    try:
        cfg = MeftConfig(field("variant"), int(field("num_layers")), int(field("hidden")),
                         int(field("bottleneck")), int(field("rev_layers")))
    except ValueError as e:
        raise ArtifactError(path, f"__metadata__: {e}") from None
    v = cfg.coefficients
    for name, want in (("lambda", v.lam), ("beta", v.beta)):
        try:
            got = float(field(name))
        except ValueError:
            got = math.nan
        if got != want:
            raise ArtifactError(path, f"__metadata__ {name}={meta[name]!r}; {cfg.variant} uses {want!r}")
    if field("activation") != "silu":
        raise ArtifactError(path, f"__metadata__ activation={meta['activation']!r}; only 'silu' is implemented")
    return cfg


def load_meft(causal_lm, directory: str | Path) -> MeftAdapters:
    """Re-apply the MEFT tenant saved in `directory` to a fresh transformers LlamaForCausalLM (in place; returns its
    adapters). Refuses, with ArtifactError naming the file, a missing or malformed file, settings that do not fit
    the model, missing or extra tensors, wrong shapes and non-finite weights."""
    path = Path(directory) / ADAPTER_FILE
    tensors = load_tensors(path)
    cfg = _config_from_metadata(read_metadata(path), path)
    c = causal_lm.config
    if (cfg.num_layers, cfg.hidden) != (c.num_hidden_layers, c.hidden_size):
        raise ArtifactError(path, f"made for {cfg.num_layers} layers of hidden {cfg.hidden}; the model has "
                                  f"{c.num_hidden_layers} of {c.hidden_size}")
    want = {k: tuple(v.shape) for k, v in MeftAdapters(cfg).state_dict().items()}
    if set(tensors) != set(want):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise ArtifactError(path, f"tensor names differ from a {cfg.variant} adapter's: missing {missing[:3]}, "
                                  f"unexpected {extra[:3]}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(path, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if not tensors[name].is_floating_point():
            raise ArtifactError(path, f"tensor {name!r} has dtype {tensors[name].dtype}; expected floating point")
    check_finite(tensors, path)
    meft = apply_meft(causal_lm, cfg)
    meft.load_state_dict({k: t.to(meft.layers[0].f.up.weight.dtype) for k, t in tensors.items()})
    return meft


# The paper's scripts use lr 5e-4 .. 8e-4 (sec. 5, App. C).
register_method(Method("meft", "meft", 5e-4, (), ("meft_variant", "meft_rev_layers", "meft_bottleneck"),
                       _prepare, _export))
