"""The `deltafleet` command line: typer command modules only (parse options, call the stages, print)."""

from deltafleet.cli.main import app

__all__ = ["app"]
