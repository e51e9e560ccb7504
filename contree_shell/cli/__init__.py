"""The `contree` command tree and the handlers both faces share.

Public API (used by the console script and by the interactive shell):

- `cli.main.main(argv=None) -> int` — the `contree` console script.
- `cli.main.build_parser(*, for_shell=False)` — the parser tree; with `for_shell=True`
  usage errors raise `cli.errors.CliUsageError(message, usage)` and `--help` raises
  `cli.errors.CliHelp(text)` instead of exiting.
- `cli.main.make_context(...) -> Context` and `cli.context.Context` — profile, session
  key, store, output format, lazy client (starts the local server for `local`).
- `cli.main.execute(ctx, argv) -> int` — one `contree …` line inside the shell.
- `cli.run.run_line(ctx, command, …) -> int` — one bare shell line in the sandbox.
- `cli.paths.resolve_path(cwd, path)` — sandbox paths against the session cwd.
- `cli.navigate.change_directory(ctx, path) -> str` — validated `cd`.

Command modules: `run` (run, -F uploads via `filespec` + `uploads`), `inspect` (ls, cat,
grep, cp, export), `files` (file edit/cp/ls), `operations` (ps, show, kill, operation
…; `refs` resolves history references, `intervals` parses --since/--until), `session`,
`navigate` (cd, env), `images` (H-import's), `auth`, `completion` (bash/zsh/fish
scripts and the hidden `contree __complete` that reuses the shell's completion engine).
"""
