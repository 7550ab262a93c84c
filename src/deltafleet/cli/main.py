"""The `deltafleet` command line. Every command has --help; errors print one line naming the problem.

Command modules import torch and the stages inside their commands: importing them costs about 1.9 s on these CPUs
(torch alone 1.6 s, measured), which `deltafleet --help` and option errors should not pay."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from deltafleet.cli.bench import bench_app  # noqa: E402
from deltafleet.cli.compress import compress_command, merge_command  # noqa: E402
from deltafleet.cli.eval import eval_app, zoo_app  # noqa: E402
from deltafleet.cli.quant import lowbit_ppl_command, quantize_command  # noqa: E402
from deltafleet.cli.serve import serve_command, serve_demo_command  # noqa: E402
from deltafleet.cli.support import fail  # noqa: E402
from deltafleet.cli.tasks import tasks_app  # noqa: E402
from deltafleet.cli.train import train_command  # noqa: E402
from deltafleet.errors import DeltafleetError  # noqa: E402

app = typer.Typer(help="deltafleet: serve many fine-tuned variants of one base LLM.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
DEFAULT_BASE = "smollm2-135m"


def _fail(e: Exception) -> NoReturn:
    fail(console, e)


@app.command()
def info(
    base: str = typer.Option(DEFAULT_BASE, help="Embedded model name or checkpoint directory."),
    adapters: Path | None = typer.Option(None, help="Directory with one adapter per subdirectory."),
) -> None:
    """Print the base model's architecture, parameter count and dtype, and each adapter found."""
    import torch

    from deltafleet.adapters import load_adapter
    from deltafleet.models.loading import load_model
    from deltafleet.store.safetensors_io import stored_dtypes

    try:
        with console.status(f"loading {base}"):
            model, path = load_model(base, dtype=torch.float32,
                                     progress=lambda m: console.print(f"[dim]{m}[/dim]"))
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        stored = set().union(*(stored_dtypes(f) for f in path.glob("*.safetensors")))
        table = Table(title=f"base: {base}", show_header=False)
        for k, v in [
            ("path", str(path)), ("model_type", cfg.model_type), ("layers", cfg.num_layers),
            ("hidden", cfg.hidden_size), ("intermediate", cfg.intermediate_size),
            ("heads / kv heads / head_dim", f"{cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim}"),
            ("vocab", cfg.vocab_size), ("tied embeddings", cfg.tie_word_embeddings),
            ("rope", f"{cfg.rope.rope_type}, theta={cfg.rope.theta:g}"),
            ("parameters", f"{n_params:,}"), ("stored dtype", ", ".join(sorted(stored))),
        ]:
            table.add_row(k, str(v))
        console.print(table)
        if adapters is not None:
            if not adapters.is_dir():
                raise DeltafleetError(f"{adapters}: adapters directory not found")
            at = Table(title=f"adapters in {adapters}")
            for col in ("name", "kind", "rank / variant", "targets", "layers", "bytes"):
                at.add_column(col)
            for sub in sorted(p for p in adapters.iterdir() if p.is_dir()):
                try:
                    a = load_adapter(sub, cfg)
                except DeltafleetError as e:
                    at.add_row(sub.name, "[red]invalid[/red]", str(e), "", "", "")
                    continue
                c = a.config
                parts = a.parts_nbytes
                size = f"{a.nbytes:,}" + ("" if set(parts) <= {"projections"} else
                                          " (" + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + ")")
                at.add_row(sub.name, c.kind, c.summary, ",".join(c.targets), str(len(a.layers)), size)
            console.print(at)
    except DeltafleetError as e:
        _fail(e)


@app.command()
def demo(
    base: str = typer.Option(DEFAULT_BASE, help="Embedded model name or checkpoint directory."),
    prompt: str = typer.Option("What is the capital of France? Answer in one sentence.", help="User message."),
    max_tokens: int = typer.Option(48, min=1, help="Tokens to generate."),
    dtype: str = typer.Option("bfloat16", help="float32 or bfloat16."),
) -> None:
    """Load the base model through deltafleet's own model and answer one chat prompt, printing tokens/s."""
    from deltafleet.dtypes import parse_dtype
    from deltafleet.models.generate import greedy_stream
    from deltafleet.models.loading import load_model, load_tokenizer

    try:
        t0 = time.perf_counter()
        with console.status(f"loading {base} (the first run converts the embedded GGUF once)"):
            model, path = load_model(base, dtype=parse_dtype(dtype))
            tok = load_tokenizer(path)
        console.print(f"[dim]loaded {base} from {path} in {time.perf_counter() - t0:.1f} s ({dtype})[/dim]")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        console.print(f"[bold]user:[/bold] {prompt}\n[bold]assistant:[/bold] ", end="")
        stop = set(model.config.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
        out: list[int] = []
        t1 = time.perf_counter()
        first = None
        for t in greedy_stream(model, ids, max_tokens, stop_ids=tuple(stop)):
            first = first or time.perf_counter() - t1
            out.append(t)
            if t not in stop:
                console.print(tok.decode([t]), end="", highlight=False, markup=False)
        elapsed = time.perf_counter() - t1
        console.print()
        decode = (len(out) - 1) / max(elapsed - first, 1e-9) if len(out) > 1 else 0.0
        console.print(f"[green]{len(out)} tokens in {elapsed:.2f} s[/green]: prompt {len(ids)} tokens, "
                      f"time to first token {first * 1000:.0f} ms, decode {decode:.1f} tokens/s (batch 1, CPU)")
    except DeltafleetError as e:
        _fail(e)


app.command("train")(train_command)
app.add_typer(eval_app, name="eval")
app.add_typer(zoo_app, name="zoo")
app.add_typer(tasks_app, name="tasks")
app.command("compress")(compress_command)
app.command("merge")(merge_command)
app.command("quantize")(quantize_command)
app.command("lowbit-ppl")(lowbit_ppl_command)
app.command("serve")(serve_command)
app.command("serve-demo")(serve_demo_command)
app.add_typer(bench_app, name="bench")
