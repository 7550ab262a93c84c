"""OneBit's quantization-aware knowledge distillation (Xu et al. 2024, arXiv 2402.11295, section 3.4; loss and
defaults from the released `kd.py` and `scripts/llama_7b.sh`), scaled to a CPU.

The student is a copy of the full-precision model whose projections are `OneBitTrainLinear`s: a latent real
matrix (initialised to Sign(W) * 0.01, so signs can flip), g and h from SVID. Forward uses Sign(latent) with the
released code's surrogate gradient d Sign(w) / dw ≈ 1.001 - tanh(w)^2. Everything else (embedding, norms) stays
frozen at the teacher's values. The teacher is the full-precision model itself. Loss on a batch of token windows:

    L = kd_loss_scale * KL(p_teacher || p_student) + kd_beta * sum_layers mean_tokens || ĥ_T - ĥ_S ||^2

(KL per token, averaged over tokens; ĥ each decoder layer's output normalised to unit L2 norm per token). AdamW
(betas 0.9, 0.98, weight decay 0.01), lr 4e-4, linear warm-up over `kd_warmup` of the steps then cosine decay, as
the paper (which trains in fp16; here forwards run under CPU bf16 autocast by default, `kd_precision`, 1.7x faster
per step on SmolLM2; weights, gradients and AdamW state stay fp32); the scale is ours: `kd_steps` steps of
`kd_batch_size` windows of `kd_seq_len` tokens of the calibration text (the paper: 8 GPUs x 16 x 2048 tokens of
teacher-generated text).

A run keeps one checkpoint (latents, g, h, optimizer, scheduler, losses) in `<out>/onebit-kd/`, replaced every
`kd_save_every` steps and removed when the run ends; `resume` continues from it (its settings must match).
`<out>/onebit-kd.png` plots the loss curves; the manifest's stats hold them every 10 steps.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import Transformer
from deltafleet.quant.calib import attention_inputs
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.registry import ModuleKey, RunContext
from deltafleet.quant.sign_linear import LAYERNORM_EPS

CHECKPOINT_DIR = "onebit-kd"
CURVES = "onebit-kd.png"
LATENT_INIT = 0.01
Factors = dict[ModuleKey, tuple[Tensor, Tensor, Tensor]]  # (signs (R, C) ±1, g (C,), h (R,))


class SignSTE(torch.autograd.Function):
    """Sign(w) (+1 at 0) forward; gradient times 1.001 - tanh(w)^2 backward (the released code's surrogate)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors
        return grad * (1.001 - torch.tanh(w) ** 2)


class OneBitTrainLinear(nn.Module):
    """y = [LN](((x ⊙ g) Sign(latent)^T) ⊙ h) + bias with trainable latent (R, C), g (C,), h (R,)."""

    def __init__(self, signs: Tensor, g: Tensor, h: Tensor, layernorm: bool, bias: Tensor | None = None):
        super().__init__()
        self.latent = nn.Parameter(signs.float() * LATENT_INIT)
        self.g, self.h = nn.Parameter(g.float().clone()), nn.Parameter(h.float().clone())
        self.layernorm = layernorm
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x * self.g, SignSTE.apply(self.latent)) * self.h
        if self.layernorm:
            y = F.layer_norm(y, (y.shape[-1],), eps=LAYERNORM_EPS)
        return y if self.bias is None else y + self.bias

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.where(self.latent >= 0, 1.0, -1.0).detach(), self.g.detach().clone(), self.h.detach().clone()


def student_model(teacher: Transformer, factors: Factors, layernorm: bool) -> tuple[Transformer, dict]:
    """A copy of `teacher` with every projection in `factors` swapped for a `OneBitTrainLinear`; only those train."""
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    linears = {}
    for (layer, proj), (s, g, h) in factors.items():
        block = student.model.layers[layer]
        parent = block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
        old = getattr(parent, proj)
        linears[(layer, proj)] = OneBitTrainLinear(s, g, h, layernorm, old.bias)
        setattr(parent, proj, linears[(layer, proj)])
    return student, linears


def forward_hidden(model: Transformer, ids: Tensor) -> tuple[Tensor, list[Tensor]]:
    """ids (B, T) full windows -> logits (B, T, V), every decoder layer's output (B, T, H)."""
    B, T = ids.shape
    x = model.model.embed_tokens(ids).float()
    a = attention_inputs(model, B, T, x.dtype)
    hidden = []
    for block in model.model.layers:
        x = block(x, a, None)
        hidden.append(x)
    return model.lm_head(model.model.norm(x)), hidden


def kd_loss(t_logits: Tensor, t_hidden: list[Tensor], s_logits: Tensor, s_hidden: list[Tensor], loss_scale: float,
            beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(total, KL per token, summed normalised-hidden MSE): OneBit's distillation loss (module docstring)."""
    V = t_logits.shape[-1]
    kl = F.kl_div(F.log_softmax(s_logits.reshape(-1, V), -1), F.log_softmax(t_logits.reshape(-1, V), -1),
                  log_target=True, reduction="batchmean")
    mse = sum(((F.normalize(t, dim=-1) - F.normalize(s, dim=-1)) ** 2).sum(-1).mean()
              for t, s in zip(t_hidden, s_hidden, strict=True))
    return loss_scale * kl + beta * mse, kl, mse


def _schedule(cfg: QuantConfig) -> Callable[[int], float]:
    warm = int(cfg.kd_warmup * cfg.kd_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, cfg.kd_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save leaves the previous checkpoint


def plot_curves(losses: list[list[float]], path: Path, title: str) -> None:
    """losses [[step, total, kl, mse], ...] -> a PNG of the three curves (moving average over 10 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.tensor(losses, dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col, name in zip(axes, (1, 2, 3), ("total loss", "KL(teacher || student) per token",
                                               "sum over layers of normalised hidden MSE"), strict=True):
        y = t[:, col]
        k = min(10, len(y))
        smooth = torch.nn.functional.avg_pool1d(y[None, None], k, 1).flatten() if k > 1 else y
        ax.plot(t[:, 0], y, alpha=0.3, lw=0.8)
        ax.plot(t[k - 1:, 0], smooth, lw=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distill(teacher: Transformer, factors: Factors, cfg: QuantConfig, windows: Tensor,
            progress: Callable[[str], None], ctx: RunContext) -> tuple[Factors, dict[str, Any]]:
    """Train the OneBit factors by knowledge distillation from `teacher` on `windows` (N, T); returns the trained
    factors and the run's stats (losses every 10 steps, seconds, steps)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    teacher.eval()
    student, linears = student_model(teacher, factors, cfg.onebit_layernorm)
    params = [p for m in linears.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.kd_lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    ckpt = None if ctx.workdir is None else Path(ctx.workdir) / CHECKPOINT_DIR / "checkpoint.pt"
    settings = cfg.settings()
    step, losses, seconds = 0, [], 0.0
    if ckpt is not None and ckpt.is_file():
        if not ctx.resume:
            raise DeltafleetError(f"{ckpt.parent}: holds a distillation checkpoint of an earlier run; pass --resume "
                                  f"to continue it or choose another --out")
        state = torch.load(ckpt, weights_only=True)
        if state["settings"] != settings:
            raise DeltafleetError(f"{ckpt}: was written with other settings ({state['settings']}); resume with "
                                  f"the same options")
        for key, m in linears.items():
            m.load_state_dict(state["linears"][f"{key[0]}.{key[1]}"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses, seconds = state["step"], state["losses"], state["seconds"]
        progress(f"onebit: resumed distillation at step {step}/{cfg.kd_steps}")

    def save() -> None:
        if ckpt is not None:
            _save(ckpt, {"settings": settings, "step": step, "losses": losses, "seconds": seconds,
                         "linears": {f"{k[0]}.{k[1]}": m.state_dict() for k, m in linears.items()},
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})

    N, B = windows.shape[0], cfg.kd_batch_size
    columns = (TextColumn("onebit kd"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TextColumn("{task.fields[s_step]:.2f} s/step"), TimeRemainingColumn())
    with Progress(*columns, disable=not ctx.show_progress) as bar:
        task = bar.add_task("kd", total=cfg.kd_steps, completed=step, loss=float("nan"), s_step=0.0)
        while step < cfg.kd_steps:
            t0 = time.perf_counter()
            ids = windows[torch.arange(step * B, (step + 1) * B) % N]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.kd_precision == "bf16"):
                with torch.no_grad():
                    t_logits, t_hidden = forward_hidden(teacher, ids)
                student.train()
                s_logits, s_hidden = forward_hidden(student, ids)
            loss, kl, mse = kd_loss(t_logits.float(), [h.float() for h in t_hidden], s_logits.float(),
                                    [h.float() for h in s_hidden], cfg.kd_loss_scale, cfg.kd_beta)
            if not torch.isfinite(loss):
                raise DeltafleetError(f"onebit: distillation loss is {float(loss)} at step {step}; lower --kd-lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            seconds += dt
            losses.append([step, loss.item(), kl.item(), mse.item()])
            bar.update(task, completed=step, loss=losses[-1][1], s_step=dt)
            if step % 10 == 0 or step == cfg.kd_steps:
                _, total, kl_v, mse_v = losses[-1]
                progress(f"onebit kd: step {step}/{cfg.kd_steps} loss {total:.4f} (kl {kl_v:.4f}, mse {mse_v:.4f})")
            if cfg.kd_save_every and step % cfg.kd_save_every == 0 and step < cfg.kd_steps:
                save()
    if ctx.workdir is not None and losses:
        Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
        plot_curves(losses, Path(ctx.workdir) / CURVES,
                    f"OneBit distillation: {cfg.kd_steps} steps x {B} x {windows.shape[1]} tokens, lr {cfg.kd_lr}")
    if ckpt is not None and ckpt.is_file():
        ckpt.unlink()
        if not any(ckpt.parent.iterdir()):
            ckpt.parent.rmdir()
    trained = {key: m.factors() for key, m in linears.items()}
    first, last = losses[0] if losses else None, losses[-1] if losses else None
    stats = {"steps": step, "seconds": round(seconds, 1), "tokens": step * B * windows.shape[1],
             "first": first, "last": last, "curve": [row for row in losses if row[0] % 10 == 0 or row is last],
             "flipped_signs": sum(int((m.factors()[0] != factors[k][0]).sum()) for k, m in linears.items()),
             "signs": sum(m.latent.numel() for m in linears.values())}
    return trained, stats
