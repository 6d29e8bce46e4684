"""Terminal output: one place for rich tables and messages (callers decide which process prints)."""

from __future__ import annotations


def say(text: str, *, stderr: bool = True) -> None:
    from rich.console import Console

    Console(stderr=stderr).print(text, highlight=False, soft_wrap=True)


def print_table(title: str, rows, headers=("", ""), *, stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=any(headers))
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console(stderr=stderr).print(table)
