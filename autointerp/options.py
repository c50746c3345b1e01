"""Command-line pieces shared by the stages: old option names, and the --steps list.

One name per idea across every subcommand (docs/cli.md lists them; tests/test_cli_names.py
checks the CLI against it). A renamed option keeps its old name for one release as a hidden
alias: the stage's command function is marked with `renamed({"--limit": "--docs"})` and the
CLI (autointerp.cli) rewrites the old name to the new one before click reads the command line,
printing a one-line note, so `--help` shows only the new name. An alias may name the command's
positional argument instead (`{"--run": "RUN_DIR"}`: `--run X` becomes `X`). An old name that
now means another idea elsewhere is not kept: `renamed(refused={"--window": "--context-len"})`
makes it a usage error that names the new option, rather than a silently different run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def renamed(aliases: dict[str, str] | None = None, refused: dict[str, str] | None = None) -> Callable[[F], F]:
    """Mark a command function with its old option names: `aliases` old -> new (still accepted),
    `refused` old -> new (a usage error that points at the new name)."""
    def mark(fn: F) -> F:
        fn.old_names = dict(aliases or {})  # type: ignore[attr-defined]
        fn.refused_names = dict(refused or {})  # type: ignore[attr-defined]
        return fn
    return mark


def old_names(command: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(aliases, refused) of a click command made from a function marked by `renamed`."""
    callback = getattr(command, "callback", None)
    return dict(getattr(callback, "old_names", {})), dict(getattr(callback, "refused_names", {}))


def rewrite_args(args: Sequence[str], aliases: dict[str, str], refused: dict[str, str],
                 takes_value: set[str]) -> tuple[list[str], list[str], str | None]:
    """The command line with old option names replaced by the new ones: (args, notes, refusal).

    `takes_value` holds the option strings that read a value, so a value that happens to look
    like an old name (`--server-arg --threads`) is left alone; nothing after `--` is touched."""
    out: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out += args[i:]
            break
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in refused:
            return out, notes, f"No such option: {name} (it is now {refused[name]}; {name} means another thing in other commands)"
        if name in aliases:
            new = aliases[name]
            now = new if new.startswith("-") else f"the {new} argument"
            notes.append(f"note: {name} is now {now}; the old name will go in a later release")
            if new.startswith("-"):
                out.append(new + eq + value)
                i += 1
            else:  # the positional argument: --run X -> X
                if eq:
                    out.append(value)
                    i += 1
                else:
                    out += args[i + 1:i + 2]
                    i += 2
            continue
        out.append(arg)
        if name in takes_value and not eq and i + 1 < len(args):
            out.append(args[i + 1])
            i += 2
        else:
            i += 1
    return out, notes, None


def parse_steps(values: Sequence[str] | str | None) -> list[int]:
    """--steps: checkpoint steps as a comma list, repeatable (`--steps 10,100 --steps 600`),
    sorted and without repeats; empty for none given."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    steps: set[int] = set()
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                step = int(part)
            except ValueError:
                raise typer.BadParameter(f"{value!r}: expected comma-separated steps, e.g. 10,100") from None
            if step < 0:
                raise typer.BadParameter(f"{value!r}: steps are 0 or more")
            steps.add(step)
    return sorted(steps)


STEPS_HELP = "comma-separated, e.g. 10,100,600 (repeatable)"
