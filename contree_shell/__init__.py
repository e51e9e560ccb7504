"""contree-shell: the interactive shell, CLI and local server for branching sandboxes."""

__version__ = "0.1.0"
