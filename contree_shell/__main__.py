"""`python -m contree_shell` runs the `contree` command."""

from contree_shell.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
