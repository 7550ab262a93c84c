"""`deltafleet tasks list` and `deltafleet tasks sample`. Imports nothing heavy until a command runs."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deltafleet.errors import DeltafleetError

tasks_app = typer.Typer(help="Tenant tasks: list them, show examples.", no_args_is_help=True)
console = Console()


@tasks_app.command("list")
def list_tasks() -> None:
    """Name, metric kind, description and split sizes of every registered task."""
    from deltafleet.tasks import TASKS

    try:
        table = Table(title="tasks")
        for col in ("name", "kind", "description", "train", "val", "test"):
            table.add_column(col, justify="right" if col in ("train", "val", "test") else "left")
        for task in sorted(TASKS.values(), key=lambda t: t.kind):  # exact-match tasks first, then open text
            s = task.sizes
            table.add_row(task.name, task.kind, task.description, str(s.train), str(s.val), str(s.test))
        console.print(table)
    except DeltafleetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None


@tasks_app.command("sample")
def sample(
    name: str = typer.Argument(..., help="Task name (see `deltafleet tasks list`)."),
    n: int = typer.Option(3, "-n", min=1, help="How many examples."),
    split: str = typer.Option("train", help="train, val or test."),
    seed: int = typer.Option(0, help="Seed of the generator / shuffle."),
) -> None:
    """Print the first N examples of a task's split: the user prompt and the expected answer."""
    from deltafleet.tasks import get_task

    try:
        for i, ex in enumerate(get_task(name).examples(split, n=n, seed=seed)):
            console.rule(f"{name} {split} #{i} (seed {seed})")
            console.print(Text.assemble(("prompt: ", "bold"), ex.prompt))
            console.print(Text.assemble(("answer: ", "bold"), ex.answer))
    except DeltafleetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
