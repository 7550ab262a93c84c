"""What every command module shares: report an input error on the console and exit with status 2."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console


def fail(console: Console, e: Exception) -> NoReturn:
    console.print(f"[red]error:[/red] {e}")
    raise typer.Exit(code=2) from None
