"""`deltafleet quantize` and `deltafleet lowbit-ppl` (the decode benchmark is `bench lowbit`, in `cli.bench`).
torch, transformers and peft are imported only when a command runs (see `cli.main`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from deltafleet.cli.support import fail
from deltafleet.errors import DeltafleetError

console = Console()


def _fail(e: Exception) -> NoReturn:
    fail(console, e)


def quantize_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or full-precision checkpoint directory."),
    bits: int | None = typer.Option(None, help="Bits per weight code: 2, 3, 4 (default) or 8; onebit: 1."),
    method: str = typer.Option("rtn", help="rtn, gptq, loftq (+ lora_init/), apiq (+ lora_init/) or onebit."),
    out: Path = typer.Option(..., help="Output directory (the quantized base; `--base DIR` in every command)."),
    calib: Path | None = typer.Option(None, help="UTF-8 calibration (onebit: distillation) text (default: the "
                                                 "Shakespeare train plays)."),
    group_size: int = typer.Option(64, help="Input columns per quantization group."),
    samples: int = typer.Option(32, help="Calibration windows (gptq, apiq)."),
    seq_len: int = typer.Option(128, help="Tokens per calibration window."),
    rank: int = typer.Option(16, help="LoRA rank of lora_init/ (loftq, apiq); fine-tune with the same --rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha of lora_init/; fine-tune with the same --alpha."),
    epochs: int = typer.Option(2, help="ApiQ epochs over the calibration windows per block."),
    lr_lwc: float = typer.Option(5e-3, help="ApiQ learning rate of the clipping factors."),
    lr_lora: float = typer.Option(5e-4, help="ApiQ learning rate of LoRA A, B."),
    loftq_iters: int = typer.Option(5, help="LoftQ alternations."),
    dense_dtype: str = typer.Option("bfloat16", help="Storage dtype of norms, biases and dense tables."),
    embedding: str = typer.Option("dense", help="Embedding table (and an untied lm_head): dense, or rtn (RTN at "
                                                "--bits and --group-size; the tied LM head shares it)."),
    seed: int = typer.Option(0, help="Seed of calibration windows and ApiQ's LoRA init and order."),
    svid: str = typer.Option("svd", help="onebit: SVID's rank-1 factorisation of |W|, svd or nmf (same optimum)."),
    onebit_layernorm: bool = typer.Option(False, "--layernorm/--no-layernorm",
                                          help="onebit: a non-affine LayerNorm after each projection (released "
                                               "code); off by default (see README)."),
    kd_steps: int = typer.Option(1000, help="onebit: distillation steps (0: SVID only)."),
    kd_windows: int = typer.Option(2048, help="onebit: distillation text windows (cycled)."),
    kd_seq_len: int = typer.Option(128, help="onebit: tokens per distillation window."),
    kd_batch_size: int = typer.Option(2, help="onebit: windows per distillation step."),
    kd_lr: float = typer.Option(4e-4, help="onebit: AdamW peak learning rate (the paper's)."),
    kd_warmup: float = typer.Option(0.1, help="onebit: linear warm-up fraction of the steps, then cosine."),
    kd_loss_scale: float = typer.Option(0.01, help="onebit: weight of the logits' KL (the paper's)."),
    kd_beta: float = typer.Option(1.0, help="onebit: weight of the hidden-state MSE (the paper's)."),
    kd_save_every: int = typer.Option(50, help="onebit: steps between checkpoints in OUT/onebit-kd/ (0: never)."),
    kd_precision: str = typer.Option("bf16", help="onebit: distillation forwards under bf16 autocast, or fp32."),
    kd_init: Path | None = typer.Option(None, help="onebit: start from this OneBit base instead of SVID (distill "
                                              "it further, e.g. on other text)."),
    resume: bool = typer.Option(False, "--resume", help="onebit: continue the distillation checkpointed in --out."),
    progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="Draw a progress bar (onebit)."),
) -> None:
    """Quantize the base's seven projections: group-wise (RTN, GPTQ, LoftQ, ApiQ) or to 1 bit (OneBit)."""
    from deltafleet.quant.config import QuantConfig
    from deltafleet.quant.pipeline import quantize_base

    try:
        cfg = QuantConfig(method=method, bits=bits, group_size=group_size, embedding=embedding, calib_samples=samples,
                          calib_seq_len=seq_len, seed=seed, rank=rank, alpha=alpha, loftq_iters=loftq_iters,
                          apiq_epochs=epochs, apiq_lr_lwc=lr_lwc, apiq_lr_lora=lr_lora, onebit_svid=svid,
                          onebit_layernorm=onebit_layernorm, kd_steps=kd_steps, kd_windows=kd_windows,
                          kd_seq_len=kd_seq_len, kd_batch_size=kd_batch_size, kd_lr=kd_lr, kd_warmup=kd_warmup,
                          kd_loss_scale=kd_loss_scale, kd_beta=kd_beta, kd_save_every=kd_save_every,
                          kd_precision=kd_precision, kd_init=None if kd_init is None else str(kd_init))
        manifest = quantize_base(base, cfg, out, calib, dense_dtype, progress=lambda m: console.print(f"[dim]{m}"),
                                 resume=resume, show_progress=progress_bar)
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    b = manifest["bytes"]
    grouping = f" (group {group_size})" if "group_size" in manifest else ""
    console.print(f"{method} {cfg.bits}-bit{grouping} in {manifest['seconds']:.1f} s: projections "
                  f"{b['projections']:,} bytes ({b['projections'] / b['projections_bf16']:.3f} of bf16), whole model "
                  f"{b['total']:,} bytes ({b['total'] / b['total_bf16']:.3f} of bf16)", highlight=False)
    console.print(f"wrote {out}" + (" (+ lora_init/)" if manifest["lora_init"] else ""), highlight=False)


def lowbit_ppl_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name, checkpoint or quantized-base directory."),
    adapter: Path | None = typer.Option(None, help="Adapter applied on top (e.g. DIR/lora_init)."),
    split: str = typer.Option("test", help="Shakespeare split of the text: test, val or train."),
    windows: int = typer.Option(32, help="Number of windows."),
    seq_len: int = typer.Option(256, help="Tokens per window."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Held-out perplexity of a (quantized) base, optionally with an adapter, on Shakespeare plays."""
    import torch

    from deltafleet.adapters import load_adapter
    from deltafleet.eval.perplexity import windows_perplexity
    from deltafleet.models.loading import load_model, load_tokenizer
    from deltafleet.tasks.text import shakespeare_text, token_windows

    try:
        model, path = load_model(base, dtype=torch.float32)
        ids = token_windows(load_tokenizer(path), shakespeare_text(split), windows, seq_len)
        hook = None if adapter is None else load_adapter(adapter, model.config).hook(model.config)
        ppl = windows_perplexity(model, ids, hook)
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    row = {"base": str(base), "adapter": None if adapter is None else str(adapter), "split": split,
           "windows": windows, "seq_len": seq_len, "perplexity": ppl}
    if as_json:
        typer.echo(json.dumps(row))
    else:
        console.print(f"perplexity {ppl:.3f} ({windows} x {seq_len} tokens, {split})", highlight=False)
