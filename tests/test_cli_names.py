"""One name per idea: docs/cli.md's table is the input; the real commands must agree with it.

The table lists every option and argument of every subcommand, one row per idea. The test fails
when a name stands for two ideas, one idea has two names, a row is missing from a command or a
command has one the table lacks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from autointerp import cli

TABLE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

def _section(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under `## heading`, as lists of cells."""
    part = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]


def _commands_of(cell: str) -> list[str]:
    return [c.strip() for c in cell.split(",") if c.strip()]


def read_table() -> list[dict]:
    """Rows of {names, commands, meaning}."""
    text = TABLE.read_text()
    rows = []
    for names, commands, meaning in _section(text, "Options and arguments"):
        found = re.findall(r"`([^`]+)`", names)
        assert found, f"no name in {names!r}"
        rows.append({"names": found, "commands": _commands_of(commands), "meaning": meaning})
    return rows


def real_commands() -> dict[str, object]:
    """'lm train', 'collect', ... -> the click command a user runs (through the lazy CLI)."""
    out = {}
    for name, module, _ in cli.STAGES:
        command = cli.load_stage(name, module)
        subs = getattr(command, "commands", None)
        for sub_name, sub in (subs or {"": command}).items():
            out[f"{name} {sub_name}".strip()] = sub
    return out


def visible_names(command) -> set[str]:
    names = set()
    for param in command.params:
        if param.param_type_name == "argument":
            names.add(param.metavar)
        elif not getattr(param, "hidden", False):
            names.update(param.opts + param.secondary_opts)
    return names


def table_names(rows, command: str) -> set[str]:
    """What the table says `command` has."""
    return {n for row in rows if command in row["commands"] for n in row["names"]}


def test_the_table_gives_each_idea_one_name():
    rows = read_table()
    assert len(rows) > 60
    owner: dict[str, int] = {}
    for i, row in enumerate(rows):
        for name in row["names"]:
            assert name not in owner, f"{name} names two ideas: {rows[owner[name]]['meaning']!r} and {row['meaning']!r}"
            owner[name] = i
        assert row["names"][0].startswith("--") or row["names"][0].isupper(), row["names"]
    meanings = defaultdict(list)
    for row in rows:
        meanings[row["meaning"].lower()].append(row["names"][0])
    assert not [m for m in meanings.values() if len(m) > 1], "two names for one idea (same meaning)"


def _differences(rows, command: str, command_obj) -> list[str]:
    t_names, c_names = table_names(rows, command), visible_names(command_obj)
    out = []
    if missing := sorted(t_names - c_names):
        out.append(f"{command}: in docs/cli.md, not in the command: {missing}")
    if extra := sorted(c_names - t_names):
        out.append(f"{command}: in the command, not in docs/cli.md: {extra}")
    return out


def test_the_table_and_the_commands_agree():
    rows = read_table()
    commands = real_commands()
    named = {c for row in rows for c in row["commands"]}
    assert not named - set(commands), f"docs/cli.md names commands that do not exist: {named - set(commands)}"
    problems = [p for name, command in commands.items() for p in _differences(rows, name, command)]
    assert not problems, "\n".join(problems)


DOCS = [TABLE.parents[1] / "README.md", *sorted((TABLE.parent).glob("*.md"))]
GROUPS = {"lm", "sae", "records"}


def documented_commands():
    """(file, line, subcommand, options) of every `autointerp ...` command line in a code block of
    the README and docs/ (a `# comment` cut off; a value after --server-arg is not an option)."""
    for path in DOCS:
        in_block = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            match = re.match(r"(?:\s*(?:\$ )?(?:time )?|.*\| )(?:\.venv/bin/)?autointerp ([a-z]+)(?: ([a-z]+))?(.*)", line)
            if not in_block or not match:
                continue
            first, second, rest = match.groups()
            command = f"{first} {second}" if first in GROUPS and second else first
            if first not in GROUPS and second:
                rest = f" {second}{rest}"
            words = rest.split(" #")[0].replace("[", " ").replace("]", " ").split()
            options, skip = [], False
            for word in words:
                if not skip and word.startswith("--"):
                    options.append(word.split("=")[0])
                skip = word == "--server-arg"
            yield path.name, number, command, options


def test_the_readme_and_docs_use_the_current_names():
    """A command line shown in the README or docs/ uses each option by its current name."""
    commands = real_commands()
    stale = []
    seen = 0
    for name, number, command, options in documented_commands():
        if command not in commands:
            continue
        seen += 1
        names = visible_names(commands[command]) | {"--help"}
        stale += [f"{name}:{number}: autointerp {command} {o}" for o in options if o not in names]
    assert seen > 30
    assert not stale, "old or unknown option names:\n" + "\n".join(stale)
