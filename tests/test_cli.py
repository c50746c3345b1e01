"""The command line as a user meets it: usage mistakes, one-line errors, help text, start-up cost."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autointerp import cli
from autointerp.jsonl import write_jsonl
from autointerp.schema import Context, FeatureRecord


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """autointerp's real entry point (cli.main) in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(stop.value.code or 0), out.out, out.err


@pytest.fixture()
def records(tmp_path) -> Path:
    path = tmp_path / "records.jsonl"
    write_jsonl(path, [FeatureRecord("m", 0, 10, i, [Context(["a", "b"], [0, 10])]) for i in range(3)])
    return path


def _usage_error(code: int, err: str, command: str) -> None:
    path = " ".join(["autointerp", *command.split()])
    assert code == 2, err
    assert f"Usage: {path} " in err
    assert f"Try '{path} --help' for help." in err
    assert "internal error" not in err and "Traceback" not in err


@pytest.mark.parametrize("args, command, message", [
    (["records", "show", "{records}"], "records show", "Missing option '--feature'"),
    (["lineage"], "lineage", "Missing argument 'RUN_DIR'"),
    (["records", "show", "{records}", "--feature", "1", "--bogus"], "records show", "No such option: --bogus"),
    (["records", "show", "{records}", "--feature"], "records show", "Option '--feature' requires an argument"),
    (["sae", "train", "--k"], "sae train", "Option '--k' requires an argument"),
    (["record"], "", "No such command 'record'. Did you mean 'records'"),
    (["records", "shw"], "records", "No such command 'shw'"),
    (["records", "show", "{records}", "--feature", "abc"], "records show", "Invalid value for '--feature'"),
    (["records", "show", "{records}", "--feature", "1", "--on-error", "maybe"], "records show",
     "Invalid value for '--on-error'"),
    # counts: ranges, not silently wrong output
    (["records", "show", "{records}", "--feature", "1", "--contexts", "-2"], "records show",
     "Invalid value for '--contexts'"),
    (["compare", "{records}", "{records}", "--show", "-1"], "compare", "Invalid value for '--show'"),
    (["annotate", "{records}", "--out", "h.jsonl", "--features", "-1"], "annotate", "Invalid value for '--features'"),
    (["annotate", "{records}", "--out", "h.jsonl", "--features", "some"], "annotate", "Invalid value for '--features'"),
    (["collect", "{records}", "--top-k", "0"], "collect", "Invalid value for '--top-k'"),
    (["collect", "{records}", "--steps", "10,x"], "collect", "Invalid value for '--steps'"),
    (["lineage", "{records}", "--quantile", "1.5"], "lineage", "Invalid value for '--quantile'"),
    (["sae", "train", "--k", "0"], "sae train", "Invalid value for '--k'"),
    (["lm", "train", "--train-steps", "0"], "lm train", "Invalid value for '--train-steps'"),
    (["lm", "train", "--steps", "-5"], "lm train", "Invalid value for '--steps'"),
    (["report", "{records}", "--per-page", "0"], "report", "Invalid value for '--per-page'"),
    (["demo", "--features", "0"], "demo", "Invalid value for '--features'"),
])
def test_usage_mistakes_get_the_usage_line_and_exit_2(capsys, records, args, command, message):
    args = [a.replace("{records}", str(records)) for a in args]
    code, _, err = _run(capsys, *args)
    _usage_error(code, err, command)
    assert message in err


def test_usage_error_through_the_installed_entry_point(records):
    """`python -m autointerp.cli` (what the `autointerp` script runs), as a user types it."""
    result = subprocess.run([sys.executable, "-m", "autointerp.cli", "records", "show", str(records)],
                            capture_output=True, text=True, timeout=120)
    _usage_error(result.returncode, result.stderr, "records show")
    assert "Missing option '--feature'" in result.stderr


def test_user_errors_are_one_line_and_bugs_say_internal_error(capsys, records, tmp_path, monkeypatch):
    code, _, err = _run(capsys, "records", "show", str(records), "--feature", "99")
    assert code == 1 and err.strip() == f"error: {records}: no feature 99"

    # a message with brackets is printed as written, not eaten as markup
    from autointerp.errors import UserError

    def broken(*_args, **_kwargs):
        raise UserError("--quantile must be in [0.5, 1)")

    monkeypatch.setattr("autointerp.human.compare.compare_files", broken)
    code, _, err = _run(capsys, "compare", str(records), str(records))
    assert code == 1 and "[0.5, 1)" in err

    def bug(*_args, **_kwargs):  # fault injection: a real bug
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("autointerp.human.compare.compare_files", bug)
    code, _, err = _run(capsys, "compare", str(records), str(records))
    assert code == 2 and "internal error: ZeroDivisionError: division by zero" in err
    assert "Usage:" not in err


HEAVY = ("torch", "transformers", "openai", "sklearn", "matplotlib")


def test_top_level_help_imports_no_heavy_module():
    code = ("import sys\nfrom autointerp.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
    for name, _, _ in cli.STAGES:
        assert re.search(rf"│ {name} ", result.stdout), f"{name} missing from the command list"
    # the command list says what `label` does: a sample with --features N, not every feature
    assert "every feature" not in result.stdout and "--features N" in result.stdout


def _help(capsys, *command: str) -> str:
    code, out, err = _run(capsys, *command, "--help")
    assert code == 0, err
    return out


def _commands() -> list[tuple[str, ...]]:
    out = []
    for name, _, _ in cli.STAGES:
        command = cli.load_stage(name, dict((n, m) for n, m, _ in cli.STAGES)[name])
        subs = getattr(command, "commands", None)
        out += [(name, sub) for sub in subs] if subs else [(name,)]
    return out


def test_every_help_reads_like_a_cli_not_like_python(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    commands = _commands()
    assert ("records", "show") in commands and ("sae", "metrics") in commands and ("annotate",) in commands
    for command in commands:
        text = _help(capsys, *command)
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert usage.split("Usage: ")[1].startswith("autointerp " + " ".join(command)), usage
        for python_ism in ("<bool>", "<int", "<str>", "<path>", "<float>", "list[", "{", "}"):
            assert python_ism not in text, f"{command}: {python_ism!r} in its help"
        assert not re.search(r"see autointerp\.|autointerp\.\w+\.\w+", text), f"{command}: a pointer into the code"
        assert "--install-completion" not in text
        # arguments are named in capitals in the usage line (RUN_DIR, RECORDS)
        words = usage.split()[3 + len(command) - 1:]
        assert all(w.strip("[].") == w.strip("[].").upper() for w in words), usage
    assert "RECORDS" in _help(capsys, "records", "show")
    assert "RUN_DIR" in _help(capsys, "lineage")
    assert "INTEGER [x>=1]" in _help(capsys, "collect")  # --top-k's range is shown


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("autointerp ")


def test_interrupt_says_work_is_kept(capsys, records, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("autointerp.human.compare.compare_files", interrupted)
    code, _, err = _run(capsys, "compare", str(records), str(records))
    assert code == 130 and "finished work is saved" in err


def test_counts_of_every_stage_command_are_ranged():
    """Every count option (int, not a seed, id or layer) of the commands this issue covers has a
    lower bound, so -1 or 0 is a usage error, not a silently odd run."""
    unbounded = []
    skip_modules = {"serve", "label", "score"}  # changed by other work in flight
    for name, module, _ in cli.STAGES:
        if name in skip_modules:
            continue
        command = cli.load_stage(name, module)
        for sub in (getattr(command, "commands", {}) or {"": command}).values():
            for param in sub.params:
                desc = getattr(param, "type_descriptor", None)
                if param.param_type_name != "option" or desc is None or desc.annotation is not int:
                    continue
                if param.name in ("seed",):
                    continue
                if getattr(param, "min", None) is None:
                    unbounded.append(f"{name} {sub.name} --{param.name}")
    assert not unbounded, unbounded
