"""The `autointerp` command line: one subcommand per pipeline stage.

Each stage module exposes `cli`: a typer.Typer (a command group, e.g. `lm train`) or a
plain function (a single command). The top level lists them from STAGES without importing
them (torch, transformers, openai and scikit-learn load only when a stage runs or shows its
own help), so `autointerp --help` is instant.

Errors: a usage mistake (a missing or unknown option, a bad value, a mistyped subcommand)
prints click's usage line, the error and "Try 'autointerp ... --help'", exit 2. A UserError
(bad input or an unavailable resource) prints one line, exit 1. Anything else is a bug and
prints one line too (exit 2) unless AUTOINTERP_DEBUG=1.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

# Before torch loads: busy-waiting OpenMP threads made torch 4-6x slower on a shared
# 2-core machine (measured on collect and SAE training); passive waiting costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer
from typer.core import TyperCommand, TyperGroup

from autointerp import __version__
from autointerp.errors import UserError

# (subcommand, module, summary for the command list): the order is the pipeline's.
STAGES = [
    ("lm", "autointerp.lm.train", "Train the tiny bilingual LM whose checkpoints the demo labels."),
    ("activations", "autointerp.lm.activations",
     "Extract one layer's residual stream over a corpus: a summary, or shards with --out."),
    ("sae", "autointerp.sae.cli", "Train TopK sparse autoencoders and measure them."),
    ("collect", "autointerp.records.cli", "Collect feature records: each latent's top contexts, negatives and density."),
    ("records", "autointerp.records.cli", "Inspect and import feature records."),
    ("lineage", "autointerp.lineage.cli", "Match each checkpoint's latents to their parents at the previous checkpoint."),
    ("serve", "autointerp.llm.serve", "Start an OpenAI-compatible LLM server: llama.cpp on CPU, vLLM on GPU."),
    ("label", "autointerp.labels.stage",
     "Label every live latent (statistical) and an LLM-described, stratified sample: description, scores, control."),
    ("score", "autointerp.interp.cli", "Score descriptions with the simulator: writes step-N/scores.jsonl (and labels)."),
    ("compare", "autointerp.human.compare",
     "Compare human and model granularity labels: Cohen's kappa, confusion, per-class P/R/F1."),
    ("annotate", "autointerp.human.annotate",
     "Label features by hand in the terminal (label's sample with --features N)."),
    ("report", "autointerp.report.cli", "Render the HTML report: RUN_DIR/report/index.html and a page per checkpoint."),
    ("demo", "autointerp.demo", "Run the whole pipeline on the embedded default and print where the report is."),
]

# click's exception types: typer >= 0.2x vendors click, older typer uses it; both raise these.
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


# --------------------------------------------------------------------------- help as the field writes it

_TYPE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOLEAN"}
_HELP_NAMES = SimpleNamespace(help_option_names=["--help"])


def _option_metavar(param: Any) -> str:
    """INTEGER, TEXT, PATH, ... as click names them; nothing for a flag."""
    if getattr(param, "is_flag", False):
        return ""
    desc = getattr(param, "type_descriptor", None)  # typer >= 0.2x
    if desc is None:
        return getattr(getattr(param, "type", None), "name", "value").upper()
    if getattr(desc, "is_path", False):
        return "PATH"
    annotation = desc.annotation
    if getattr(desc, "is_list", False) and get_args(annotation):
        annotation = get_args(annotation)[0]
    return _TYPE_NAMES.get(annotation, "VALUE")


def _with_usage(command: Any) -> None:
    """click's parser raises "Option '--x' requires an argument." without the command's context,
    so it would print no usage line: attach the context it was parsing."""
    parse = command.make_context

    def make_context(info_name, args, parent=None, **extra):
        try:
            return parse(info_name, args, parent=parent, **extra)
        except _USAGE_ERROR as exc:
            if exc.ctx is None:
                exc.ctx = command.context_class(command, info_name=info_name, parent=parent)
                exc.cmd = command
            raise

    command.make_context = make_context


def plain_help(command: Any) -> Any:
    """Metavars instead of Python types: arguments by name (RUN_DIR, RECORDS; bare when required,
    [NAME] when optional), options by click's type names (INTEGER, PATH), flags with none; and a
    usage line with every usage error."""
    _with_usage(command)
    for param in command.params:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            param.get_usage_pieces = lambda ctx, p=param: [p.metavar if p.required else f"[{p.metavar}]"]
            if hasattr(param, "display_type_rich"):  # typer's type column: PATH, not <path>
                param.display_type_rich = lambda ctx, p=param: _option_metavar(p)
        elif param.metavar is None:
            param.metavar = _option_metavar(param)
    help_option = command.get_help_option(_HELP_NAMES)  # cached on the command by typer's click
    if help_option is not None:
        help_option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        if not isinstance(sub, LazyCommand):
            plain_help(sub)
    return command


# --------------------------------------------------------------------------- lazy subcommands

def load_stage(name: str, module_name: str) -> Any:
    """The click command of a stage: its module's `cli_<name>` or `cli`, a Typer or a function."""
    module = importlib.import_module(module_name)
    entry = getattr(module, f"cli_{name}", None) or getattr(module, "cli")
    if isinstance(entry, typer.Typer):
        command = typer.main.get_group(entry)
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(entry)
        command = typer.main.get_command(single)
    command.name = name
    return plain_help(command)


class LazyCommand(TyperCommand):
    """A subcommand known by name and summary; its module is imported when it runs or shows help."""

    def __init__(self, name: str, module: str, summary: str):
        super().__init__(name, help=summary, short_help=summary)
        self.module = module
        self._loaded: Any = None

    def load(self) -> Any:
        if self._loaded is None:
            self._loaded = load_stage(self.name, self.module)
        return self._loaded

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        # the group invokes the context's command: the real one from here on
        return self.load().make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    """The top-level group: every stage of STAGES as a LazyCommand, in pipeline order."""

    def __init__(self, **attrs: Any):
        super().__init__(**attrs)
        for name, module, summary in STAGES:
            self.add_command(LazyCommand(name, module, summary))
        plain_help(self)


app = typer.Typer(
    name="autointerp",
    cls=LazyGroup,
    help="Label the features of sparse autoencoders across training checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"autointerp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Label the features of sparse autoencoders across training checkpoints."""


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, prog_name="autointerp", standalone_mode=False)
    except UserError as exc:
        from rich.markup import escape

        _err(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(1)
    except _CLICK_EXCEPTION as exc:  # usage errors: usage line, the error, "Try ... --help"; exit 2
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        _err("[yellow]interrupted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        _err("[yellow]interrupted: finished work is saved; run the same command again to resume[/]")
        sys.exit(130)
    except Exception as exc:  # a bug: one line for users, the traceback on request
        if os.environ.get("AUTOINTERP_DEBUG"):
            raise
        from rich.markup import escape

        _err(f"[bold red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')} "
             "(set AUTOINTERP_DEBUG=1 for the traceback)")
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        _err("[yellow]interrupted: finished work is saved; run the same command again to resume[/]")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
