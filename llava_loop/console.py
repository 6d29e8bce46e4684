"""Terminal output: one place for rich tables and messages.

``say`` and ``print_table`` print from whichever process calls them (the CLI is one process). A run's
``Console`` prints only where it is enabled, the main process, so "say" means the same thing everywhere:
print this message, once.
"""

from __future__ import annotations


def say(text: str, *, stderr: bool = True) -> None:
    from rich.console import Console as RichConsole

    RichConsole(stderr=stderr).print(text, highlight=False, soft_wrap=True)


def say_on_main(text: str) -> None:
    """``say`` from the main process only, for code that has no run ``Console`` (the data modules); the launcher's
    ``RANK`` tells which that is (unset outside a launch)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        say(text)


def print_table(title: str, rows, headers=("", ""), *, stderr: bool = False) -> None:
    from rich.console import Console as RichConsole
    from rich.table import Table

    table = Table(title=title, show_header=any(headers))
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    RichConsole(stderr=stderr).print(table)


class Console:
    """Messages, warnings and tables of one run, printed (to stderr) only where ``enabled``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def say(self, text: str) -> None:
        if self.enabled:
            say(text)

    def warn(self, text: str) -> None:
        self.say(f"[yellow]warning:[/yellow] {text}")

    def table(self, title: str, headers, rows) -> None:
        if self.enabled:
            print_table(title, rows, headers, stderr=True)
