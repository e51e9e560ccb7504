"""Entry point of the `contree` command (placeholder until the CLI lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the `contree` command line."""
    return 0
