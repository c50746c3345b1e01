"""One name per idea: docs/cli.md's tables are the input; the real commands must agree with them.

The tables list every option and argument of every subcommand, one row per idea, with the old
names kept as hidden aliases, and the old names refused. The test fails when a name stands for
two ideas (two rows, or a row and an alias), an old name for two things, a row or an alias is
missing from a command or a command has one the table lacks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from autointerp import cli
from autointerp.options import old_names

TABLE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

def _section(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under `## heading`, as lists of cells."""
    part = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]


def _commands_of(cell: str) -> list[str]:
    return [c.strip() for c in cell.split(",") if c.strip()]


def read_table() -> tuple[list[dict], dict[tuple[str, str], str]]:
    """(rows, refused): rows of {names, commands, meaning, aliases {(command, old): primary}};
    refused {(command, old): new}."""
    text = TABLE.read_text()
    rows = []
    for names, commands, meaning, aliases in _section(text, "Options and arguments"):
        found = re.findall(r"`([^`]+)`", names)
        assert found, f"no name in {names!r}"
        alias_map = {}
        # "`--run`, `--sae` (collect)": every quoted name before a parenthesis belongs to it
        for group, where in re.findall(r"((?:`[^`]+`(?:, )?)+) \(([^)]+)\)", aliases):
            for old in re.findall(r"`([^`]+)`", group):
                for command in _commands_of(where):
                    alias_map[(command, old)] = found[0]
        rows.append({"names": found, "commands": _commands_of(commands), "meaning": meaning,
                     "aliases": alias_map})
    refused = {}
    for old, command, new in _section(text, "Old names refused"):
        refused[(command.strip(), old.strip("`"))] = new.strip("`")
    return rows, refused


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


def table_view(rows, refused, command: str) -> tuple[set[str], dict[str, str], dict[str, str]]:
    """What the table says `command` has: names, aliases {old: new name}, refused {old: new}."""
    names = {n for row in rows if command in row["commands"] for n in row["names"]}
    aliases = {old: new for row in rows for (c, old), new in row["aliases"].items() if c == command}
    return names, aliases, {old: new for (c, old), new in refused.items() if c == command}


def cli_view(command_obj) -> tuple[set[str], dict[str, str], dict[str, str]]:
    aliases, refused = old_names(command_obj)
    return visible_names(command_obj), aliases, refused


def test_the_table_gives_each_idea_one_name():
    rows, refused = read_table()
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
    old_meaning: dict[str, str] = {}
    for row in rows:
        for (command, old), new in row["aliases"].items():
            assert command in row["commands"], f"alias {old} given for {command}, which has no {new}"
            # an old name kept as an alias is not a name of another idea, and means one thing
            assert old not in owner, f"old name {old} ({command}) is also the name of {rows[owner[old]]['meaning']!r}"
            # an old option that became the positional argument may meet arguments of other names
            # (collect's TARGET takes a run or an SAE folder, sae train's RUN_DIR a run folder)
            known = old_meaning.setdefault(old, new)
            assert known == new or (known.isupper() and new.isupper()), f"old name {old} stands for {known} and {new}"
    for (command, old), new in refused.items():
        assert new in owner and command in rows[owner[new]]["commands"], f"{command}: refused {old} points at {new}"
        assert old in owner or old in old_meaning, f"refused {old} ({command}) means nothing elsewhere: keep it as an alias"


def _differences(rows, refused, command: str, command_obj) -> list[str]:
    t_names, t_aliases, t_refused = table_view(rows, refused, command)
    c_names, c_aliases, c_refused = cli_view(command_obj)
    out = []
    if missing := sorted(t_names - c_names):
        out.append(f"{command}: in docs/cli.md, not in the command: {missing}")
    if extra := sorted(c_names - t_names):
        out.append(f"{command}: in the command, not in docs/cli.md: {extra}")
    if t_aliases != c_aliases:
        out.append(f"{command}: aliases in docs/cli.md {t_aliases} != the command's {c_aliases}")
    if t_refused != c_refused:
        out.append(f"{command}: refused names in docs/cli.md {t_refused} != the command's {c_refused}")
    return out


def test_the_table_and_the_commands_agree():
    rows, refused = read_table()
    commands = real_commands()
    named = {c for row in rows for c in row["commands"]} | {c for c, _ in refused}
    assert not named - set(commands), f"docs/cli.md names commands that do not exist: {named - set(commands)}"
    problems = [p for name, command in commands.items()
                for p in _differences(rows, refused, name, command)]
    assert not problems, "\n".join(problems)


def test_an_old_name_still_runs_and_a_refused_one_names_the_new(capsys, tmp_path):
    """Through the real entry point: --max-docs reaches the command as --docs with a one-line
    note; collect's --window is refused with the name to use; help shows no old name."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["collect", "--run", str(tmp_path / "missing"), "--max-docs", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "--max-docs is now --docs" in err and "--run is now the TARGET argument" in err
    assert f"TARGET {tmp_path / 'missing'}: no such file or folder" in err  # the value went to the argument

    with pytest.raises(SystemExit) as stop:
        cli.main(["collect", str(tmp_path), "--window", "64"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Usage: autointerp collect" in err
    assert "No such option: --window (it is now --context-len" in err

    cli.main(["collect", "--help"])  # help returns (exit 0) without SystemExit
    out = capsys.readouterr().out
    assert "--context-len" in out
    assert not re.search(r"--max-docs|--max-tokens|--window\b|--run\b|--sae\b", out)


def test_a_value_that_looks_like_an_old_name_is_left_alone():
    from autointerp.options import rewrite_args

    args, notes, refusal = rewrite_args(["--server-arg", "--limit", "--limit=3", "x", "--", "--limit"],
                                        {"--limit": "--docs"}, {}, {"--server-arg"})
    assert args == ["--server-arg", "--limit", "--docs=3", "x", "--", "--limit"] and len(notes) == 1
    assert refusal is None


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
