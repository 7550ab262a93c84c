"""`deltafleet train`. Imports torch, transformers and peft only when the command runs."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from deltafleet.errors import DeltafleetError

console = Console()


def train_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    task: str = typer.Option(..., help="Task name (see `deltafleet tasks list`)."),
    method: str = typer.Option(..., help="lora, road, ia3, pafi, hiwi, meft or full."),
    out: Path = typer.Option(..., help="Output directory: the adapter (or checkpoint) and checkpoints/."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    batch_size: int = typer.Option(8, help="Examples per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: lora 3e-4, road/ia3 3e-3, full 2e-5)."),
    warmup_ratio: float = typer.Option(0.1, help="Fraction of steps with linear warmup; then linear decay to 0."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0: off)."),
    rank: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha (scale alpha/rank)."),
    targets: str | None = typer.Option(
        None, help="Comma-separated projections (default: all seven for lora/road/pafi; k_proj,v_proj,down_proj for "
                   "ia3), or norms for hiwi (default: input_layernorm,post_attention_layernorm)."),
    lora_init: Path | None = typer.Option(
        None, help="Start LoRA from this peft LoRA directory (e.g. QUANTIZED_BASE/lora_init from LoftQ or ApiQ); "
                   "--rank, --alpha and --targets must match it."),
    road_variant: str = typer.Option("road_1", help="RoAd variant: road_1, road_2 or road_4."),
    road_group_size: int = typer.Option(64, help="RoAd group size."),
    pafi_density: float = typer.Option(
        0.02, help="PaFi: fraction of each target projection's entries trained (its smallest-magnitude ones)."),
    meft_variant: str = typer.Option("meft1", help="MEFT variant: meft1, meft2 or meft3."),
    meft_rev_layers: int = typer.Option(
        4, min=0, help="MEFT: the lowest N layers are reversible (recomputed in backward); more than about 4 lose "
                       "the activations to rounding (the inverse divides by 0.1 per layer)."),
    meft_bottleneck: int = typer.Option(8, help="MEFT adapter bottleneck width."),
    hiwi_bottleneck: int = typer.Option(64, help="HiWi: width of the adapter that maps each norm gain to its change."),
    max_seq_len: int = typer.Option(512, help="Longest example in tokens (longer answers are cut)."),
    precision: str = typer.Option(
        "auto", help="bf16 (CPU autocast, fp32 weights), fp32, or auto: bf16 where the CPU has native bf16 "
                     "matmuls (AVX512-BF16/AMX), else fp32."),
    seed: int = typer.Option(0, help="Seed of the data order and adapter initialisation."),
    save_every: int = typer.Option(50, help="Checkpoint every N steps (0: only at the end or on Ctrl-C)."),
    eval_examples: int = typer.Option(32, help="Validation examples for the final metrics."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
) -> None:
    """Fine-tune a base model on a task with LoRA, RoAd, IA3, PaFi, HiWi, MEFT or full fine-tuning; Ctrl-C saves a
    checkpoint."""
    import warnings

    from transformers.utils import logging as hf_logging

    from deltafleet.eval.core import validation_metrics
    from deltafleet.train.config import TrainConfig
    from deltafleet.train.recipe import train

    hf_logging.disable_progress_bar()  # the rich bar below is the one progress display
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21
    try:
        t0 = time.perf_counter()
        cfg = TrainConfig(
            base=base, task=task, method=method, out=out, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
            lr=lr, warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            lora_rank=rank, lora_alpha=alpha,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets is not None else None,
            lora_init=lora_init, road_variant=road_variant, road_group_size=road_group_size, max_seq_len=max_seq_len,
            pafi_density=pafi_density, meft_variant=meft_variant, meft_rev_layers=meft_rev_layers,
            meft_bottleneck=meft_bottleneck, hiwi_bottleneck=hiwi_bottleneck,
            precision=precision, seed=seed, save_every=save_every, eval_examples=eval_examples, resume=resume,
        )
        result = train(cfg, console=console, validate=validation_metrics)
    except (DeltafleetError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
    losses = result.losses
    console.print(f"{result.steps} steps in {result.train_seconds:.1f} s training ({time.perf_counter() - t0:.1f} s "
                  f"wall), {result.tokens_per_second:.0f} tokens/s; {result.trainable_params:,} trainable params; "
                  f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no steps run", highlight=False)
    if result.final_metrics:
        console.print(", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items()), highlight=False)
    console.print(f"wrote {result.out}", highlight=False)
    if not result.completed:
        raise typer.Exit(code=130)
