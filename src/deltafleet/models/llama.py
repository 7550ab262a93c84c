"""A compact Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral without sliding window).

One readable file in the spirit of nanoGPT / gpt-fast. Weight names follow Hugging Face's
(`model.layers.N.self_attn.q_proj.weight`, ...) so checkpoints load with `load_state_dict(assign=True)` and
peft adapter keys map one to one. The seven projections stay separate named `nn.Linear`s: adapters act on them
through a *projection hook* `hook(layer, proj, x, y) -> y` that sees the projection's input `x` and base
output `y` (LoRA and low-rank deltas add a term computed from `x`; RoAd transforms `y`). The serving engine
passes a hook that reads the batch's adapter layout; a plain forward passes none.
Hardware- or format-specific projections (a quantized base's `QuantLinear`, ...) are swapped in for these modules
at load or engine start-up and called the same way; the forward only calls them.

Shape vocabulary: B batch, T tokens (this call), S key positions, H hidden, nh heads, nkv KV heads,
hd head dim, V vocab, L layers, N cache slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.models.config import FINAL_NORM, MODEL_LAYER, NORMS, ModelConfig, RopeConfig

ProjectionHook = Callable[[int, str, Tensor, Tensor], Tensor]
"""hook(layer_index, projection_name, x (..., in), y (..., out)) -> adapted y (..., out). A decoder layer's two
RMSNorms call it too, by name (`config.NORMS`), with x the normalised input before the gain (x * rsqrt(mean(x^2) +
eps), in the activation dtype) and y the norm's output, when the hook says so (`hook.norms = True`).
With `hook.model_level = True` the model-level modules call it too, as layer `config.MODEL_LAYER`:
"embed_tokens" with x the token ids (B, T) and y their embeddings (B, T, H), the final norm "norm" (as a layer's
norms), and "lm_head" with x the final hidden states (M, H) or (B, T, H) and y the logits.
A hook with norms may also offer `hook.norm(layer, name, norm_module, x) -> y | None`: the adapted norm's output in
one call (a fused kernel); when it returns None, the norm calls the hook as above."""


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Inverse frequencies (hd/2,) in fp32, with Llama 3.1 frequency-dependent scaling when configured."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "default":
        return inv_freq
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_ctx = rope.original_max_position_embeddings
    low_freq_wavelen = old_ctx / rope.low_freq_factor
    high_freq_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (B, T) int -> cos, sin (B, T, 1, hd), computed in fp32 then cast. `sin` is sign-folded for
    `apply_rope`: its first half is negated, (-sin f, sin f) where HF has (sin f, sin f)."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).to(dtype)[:, :, None], torch.cat((-sin, sin), -1).to(dtype)[:, :, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, n, hd) rotated by position; cos, sin from `rope_cos_sin`.

    HF computes x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) for x's halves x1, x2. The same
    products, regrouped: rolling x by hd/2 gives (x2, x1), and the sign of -x2 is folded into sin's first half."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


# ----------------------------------------------------------------------------------------------- cache
@dataclass
class KVCache:
    """Keys and values for N sequence slots, allocated once: k, v (L, N, nkv, S_max, hd).

    A sequence owns one slot; a forward writes its new keys at their positions and reads the slot's prefix.
    Nothing is reallocated per step.
    """

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> KVCache:
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


@dataclass
class AttentionInputs:
    """What every layer's attention needs for one forward, computed once per call.

    `write_at` and `read_at` index a layer's cache tensor (N, nkv, S_max, hd): `cache[write_at]` is where the M
    written tokens go, (M, nkv, hd); `cache[read_at]` is the batch's keys or values, (B, nkv, S, hd).
    """

    cos: Tensor  # (B, T, 1, hd)
    sin: Tensor  # (B, T, 1, hd), sign-folded (`rope_cos_sin`)
    mask: Tensor | None  # (B, 1, T, S) bool: query may attend key; None: every query attends all S keys
    attn_dtype: torch.dtype  # the dtype q, k, v are attended in
    cache: KVCache | None
    write_rows: Tensor | None  # (M,) row b * T + t of each written token among the call's B * T; None: all, in order
    write_at: tuple | None  # (slot, :, position) of each written token: (M,) tensors, or (slice, :, int) for a view
    read_at: tuple | None  # (slots, :, :S): slots (B,) indices, or a slice (a view, no gather)
    # A ragged call (`seq_lens`): its tokens are sequences laid end to end (then padding), attended in groups
    # (`AttentionGroup`), their outputs concatenated in token order. None: the call is a (B, T) batch.
    groups: list[AttentionGroup] | None = None
    padding: int = 0  # tokens after the last group (outputs zero)


@dataclass
class AttentionGroup:
    """Consecutive tokens [start, start + rows * queries) of a ragged call attended as one (rows, queries) batch:
    a run of one-token sequences (decode tokens: rows of one query each, in fp32) or one sequence's chunk."""

    start: int
    rows: int
    queries: int
    mask: Tensor | None  # (rows, 1, queries, S) bool; None: every query attends all S keys
    read_at: tuple  # (slots (rows,), :, :S)
    attn_dtype: torch.dtype


def _rows_of(slots: Tensor) -> Tensor | slice:
    """Cache slots (n,) as a slice when consecutive (the cache is then read as a view, not gathered)."""
    first = int(slots[0])
    if bool((slots == torch.arange(first, first + slots.numel())).all()):
        return slice(first, first + slots.numel())
    return slots


# ----------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """HF's weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the normalization computed in fp32."""
        if x.dtype == self.weight.dtype == torch.float32:  # the same products in one call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)

    def unit(self, x: Tensor) -> Tensor:
        """The normalised input before the weight (`unit_rms`), which a norm hook receives."""
        return unit_rms(x, self.eps)


def unit_rms(x: Tensor, eps: float) -> Tensor:
    """x (..., H) -> x * rsqrt(mean(x^2) + eps), computed in fp32 as `RMSNorm` does, in x's dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _norm(norm: nn.Module, layer: int, name: str, x: Tensor, hook: ProjectionHook | None) -> Tensor:
    if hook is None or not getattr(hook, "norms", False):
        return norm(x)
    whole = getattr(hook, "norm", None)
    y = None if whole is None else whole(layer, name, norm, x)
    return hook(layer, name, norm.unit(x), norm(x)) if y is None else y


def _project(linear: nn.Linear, layer: int, name: str, x: Tensor, hook: ProjectionHook | None) -> Tensor:
    y = linear(x)
    return y if hook is None else hook(layer, name, x, y)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: Tensor, a: AttentionInputs, hook: ProjectionHook | None) -> Tensor:
        B, T, _ = x.shape
        layer, nh, nkv, hd = self.layer, self.nh, self.nkv, self.hd
        q = apply_rope(_project(self.q_proj, layer, "q_proj", x, hook).view(B, T, nh, hd), a.cos, a.sin)
        k = apply_rope(_project(self.k_proj, layer, "k_proj", x, hook).view(B, T, nkv, hd), a.cos, a.sin)
        v = _project(self.v_proj, layer, "v_proj", x, hook).view(B, T, nkv, hd)
        if a.cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, nkv, S = T, hd)
        else:
            ck, cv = a.cache.k[layer], a.cache.v[layer]  # (N, nkv, S_max, hd)
            k, v = k.flatten(0, 1), v.flatten(0, 1)  # (B * T, nkv, hd)
            if a.write_rows is not None:
                k, v = k[a.write_rows], v[a.write_rows]  # (M, nkv, hd)
            ck[a.write_at] = k.to(ck.dtype)
            cv[a.write_at] = v.to(cv.dtype)
            if a.groups is None:
                k, v = ck[a.read_at], cv[a.read_at]  # (B, nkv, S, hd)
        if a.groups is not None:  # a ragged call: each group reads its own keys and values
            y = self._ragged(q.reshape(B * T, nh, hd), a).view(B, T, nh * hd)
        else:
            dt = a.attn_dtype
            y = F.scaled_dot_product_attention(q.transpose(1, 2).to(dt), k.to(dt), v.to(dt), attn_mask=a.mask,
                                               enable_gqa=True)  # (B, nh, T, hd)
            y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return _project(self.o_proj, layer, "o_proj", y.to(x.dtype), hook)

    def _ragged(self, q: Tensor, a: AttentionInputs) -> Tensor:
        """q (T, nh, hd) of a ragged call -> attention outputs (T, nh * hd), group by group from the cache."""
        ck, cv = a.cache.k[self.layer], a.cache.v[self.layer]
        nh, hd, out = self.nh, self.hd, []
        for g in a.groups:
            n, dt = g.rows * g.queries, g.attn_dtype
            qg = q[g.start:g.start + n].view(g.rows, g.queries, nh, hd).transpose(1, 2)
            y = F.scaled_dot_product_attention(qg.to(dt), ck[g.read_at].to(dt), cv[g.read_at].to(dt),
                                               attn_mask=g.mask, enable_gqa=True)  # (rows, nh, queries, hd)
            out.append(y.transpose(1, 2).reshape(n, nh * hd).to(q.dtype))
        if a.padding:
            out.append(q.new_zeros(a.padding, nh * hd))
        return torch.cat(out) if len(out) > 1 else out[0]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, hook: ProjectionHook | None) -> Tensor:
        g = _project(self.gate_proj, self.layer, "gate_proj", x, hook)
        u = _project(self.up_proj, self.layer, "up_proj", x, hook)
        return _project(self.down_proj, self.layer, "down_proj", F.silu(g) * u, hook)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x: Tensor, a: AttentionInputs, hook: ProjectionHook | None) -> Tensor:
        x = x + self.self_attn(_norm(self.input_layernorm, self.layer, "input_layernorm", x, hook), a, hook)
        return x + self.mlp(_norm(self.post_attention_layernorm, self.layer, "post_attention_layernorm", x, hook), hook)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Llama-family causal LM. `forward` returns logits (B, T, V), or (M, V) for `logits_index`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        """Point a tied LM head at the embedding table (a quantized base ties its tables itself)."""
        if self.config.tie_word_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in (the final norm's weight: dense in every kind of base)."""
        return self.model.norm.weight.dtype

    def module(self, layer: int, name: str) -> nn.Module:
        """The named projection or RMSNorm (`config.NORMS`) of decoder layer `layer`, or with `MODEL_LAYER` the
        model-level "embed_tokens", "lm_head" (the embedding table's module when tied) or final "norm"."""
        if layer == MODEL_LAYER:
            if name == "lm_head" and self.config.tie_word_embeddings:
                return self.model.embed_tokens
            return {"embed_tokens": self.model.embed_tokens, "lm_head": self.lm_head, FINAL_NORM: self.model.norm}[name]
        if name in NORMS:
            return getattr(self.model.layers[layer], name)
        return self.linear(layer, name)

    def linear(self, layer: int, proj: str) -> nn.Linear:
        """The named projection `proj` of decoder layer `layer`."""
        block = self.model.layers[layer]
        parent = block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
        return getattr(parent, proj)

    def _attention_inputs(self, positions: Tensor, valid: Tensor, cache: KVCache | None,
                          slots: Tensor | slice | None, dtype: torch.dtype) -> AttentionInputs:
        B, T = positions.shape
        cos, sin = rope_cos_sin(positions, self.inv_freq, dtype)
        # A decode step (one query per row) attends in fp32, on fp32 copies of q, k, v: for one query, torch's
        # CPU attention is 2-5x faster that way than in bf16 (torch 2.13; SmolLM2's shapes, B 1-8, S 60-1024).
        attn_dtype = torch.float32 if T == 1 else dtype
        if cache is None:
            key_pos, key_valid, key_len = positions, valid, T  # keys are this call's tokens
            write_rows = write_at = read_at = None
        else:
            if slots is None:
                raise ValueError("cache_slots is required when a KV cache is given")
            key_len = int(positions[valid].max()) + 1 if bool(valid.any()) else 1
            if key_len > cache.max_len:
                raise ValueError(f"position {key_len - 1} exceeds the KV cache length {cache.max_len}")
            key_pos = torch.arange(key_len, device=positions.device).expand(B, key_len)
            key_valid = torch.ones_like(key_pos, dtype=torch.bool)
            read_at = (slots, slice(None), slice(None, key_len))
            slot_of_row = torch.arange(slots.start, slots.start + B) if isinstance(slots, slice) else slots
            if not bool(valid.all()):  # padding is not written
                wb, wt = valid.nonzero(as_tuple=True)
                write_rows, write_at = wb * T + wt, (slot_of_row[wb], slice(None), positions[wb, wt])
            elif T == 1 and isinstance(slots, slice) and bool((positions == key_len - 1).all()):
                write_rows, write_at = None, (slots, slice(None), key_len - 1)  # one position of B consecutive slots
            else:
                write_rows, write_at = None, (slot_of_row.repeat_interleave(T), slice(None), positions.flatten())
        if T == 1 and bool((positions >= key_len - 1).all()):
            # Each row's one query sits at the last key position (a decode step of sequences of one length, or
            # a cache-free call with one token): it attends every key, so the mask would be all True.
            mask = None
        else:
            mask = (key_pos[:, None, :] <= positions[:, :, None]) & key_valid[:, None, :]  # (B, T, S)
            # A padding query may have no key to attend; give it one so softmax stays finite (its output is unused).
            mask[:, :, 0] |= ~mask.any(-1)
            mask = mask[:, None]
        return AttentionInputs(cos, sin, mask, attn_dtype, cache, write_rows, write_at, read_at)

    def _ragged_inputs(self, positions: Tensor, seq_lens: Tensor, cache: KVCache | None,
                       slots: Tensor | None, dtype: torch.dtype) -> AttentionInputs:
        """Attention inputs of a ragged call: positions (1, T), the first sum(seq_lens) tokens B sequences laid
        end to end, the rest padding (neither written nor attended)."""
        if cache is None or not isinstance(slots, Tensor) or positions.shape[0] != 1:
            raise ValueError("seq_lens needs a KV cache, cache_slots as a (B,) tensor and (1, T) tokens")
        lens = seq_lens.to(torch.long)
        B, T, n_tok = lens.numel(), positions.shape[1], int(lens.sum())
        if slots.shape != (B,) or n_tok > T or bool((lens < 1).any()):
            raise ValueError(f"seq_lens {lens.tolist()} (each >= 1) must cover at most the call's {T} tokens, "
                             f"one per cache slot given ({tuple(slots.shape)})")
        cos, sin = rope_cos_sin(positions, self.inv_freq, dtype)
        pos = positions[0, :n_tok]
        key_len = int(pos.max()) + 1
        if key_len > cache.max_len:
            raise ValueError(f"position {key_len - 1} exceeds the KV cache length {cache.max_len}")
        seq_of_token = torch.repeat_interleave(torch.arange(B), lens)
        groups, b, start = [], 0, 0
        lens_list, pos_list = lens.tolist(), pos.tolist()
        while b < B:
            if lens_list[b] == 1:  # a run of decode tokens: rows of one query, in fp32 (as a decode step)
                e = b
                while e < B and lens_list[e] == 1:
                    e += 1
                qpos = pos[start:start + e - b]
                S = int(qpos.max()) + 1
                mask = None if bool((qpos == S - 1).all()) else \
                    (torch.arange(S)[None, :] <= qpos[:, None])[:, None, None, :]
                groups.append(AttentionGroup(start, e - b, 1, mask, (_rows_of(slots[b:e]), slice(None), slice(None, S)),
                                             torch.float32))
                start, b = start + e - b, e
                continue
            n = lens_list[b]  # one sequence's chunk: causal over its cached prefix and itself
            first, S = pos_list[start], pos_list[start + n - 1] + 1
            mask = (torch.arange(S)[None, :] <= torch.arange(first, S)[:, None])[None, None]
            groups.append(AttentionGroup(start, 1, n, mask, (_rows_of(slots[b:b + 1]), slice(None), slice(None, S)),
                                         dtype))
            start, b = start + n, b + 1
        write_rows = None if n_tok == T else torch.arange(n_tok)
        write_at = (slots[seq_of_token], slice(None), pos)
        return AttentionInputs(cos, sin, None, dtype, cache, write_rows, write_at, None, groups, T - n_tok)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        cache_slots: Tensor | slice | None = None,
        hook: ProjectionHook | None = None,
        logits_index: Tensor | None = None,
        seq_lens: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T); positions (B, T) default arange; attention_mask (B, T) 1 = real token.

        With `cache`, each sequence b reads and writes cache slot `cache_slots[b]` (a slice start:start+B reads
        the cache as a view instead of gathering); padding tokens are not written. `logits_index` (M,) selects
        flattened B*T positions so the LM head runs only where needed.

        Ragged (`seq_lens` (B,)): input_ids and positions are (1, T), the first sum(seq_lens) tokens B sequences
        laid end to end (sequence b in cache slot `cache_slots[b]`), any tokens after them padding. Projections run
        on the T tokens as one batch; attention per sequence. This is how a step mixes prompt chunks with decode
        tokens without padding every sequence to the longest.
        """
        B, T = input_ids.shape
        if seq_lens is not None and (positions is None or attention_mask is not None):
            raise ValueError("a ragged call (seq_lens) takes positions and no attention_mask")
        top = hook if getattr(hook, "model_level", False) else None  # hooks of the model-level modules
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        if top is not None:
            x = top(MODEL_LAYER, "embed_tokens", input_ids, x)
        if seq_lens is not None:
            a = self._ragged_inputs(positions, seq_lens, cache, cache_slots, x.dtype)
        else:
            if positions is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
            valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(torch.bool))
            a = self._attention_inputs(positions, valid, cache, cache_slots, x.dtype)
        return self._run(x, a, hook, top, logits_index)

    def _run(self, x: Tensor, a: AttentionInputs, hook: ProjectionHook | None, top: ProjectionHook | None,
             logits_index: Tensor | None) -> Tensor:
        """Embeddings x (B, T, H) through the layers, the final norm and the LM head -> logits."""
        B, T, _ = x.shape
        for block in self.model.layers:
            x = block(x, a, hook)
        x = _norm(self.model.norm, MODEL_LAYER, FINAL_NORM, x, top)
        if logits_index is not None:
            x = x.reshape(B * T, -1)[logits_index]
        return _project(self.lm_head, MODEL_LAYER, "lm_head", x, top)
