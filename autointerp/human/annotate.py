"""Label features by hand in the terminal, in the same format `autointerp compare` reads.

    autointerp annotate RECORDS --out human.jsonl [--features N] [--steps 10,600] [--annotator NAME]

`--features N` asks about the latents `autointerp label --features N` described with its LLM
(marked `sampled` in the labels.jsonl beside the records; before any label run, a plain seeded
sample of N live latents: autointerp.labels.sampling), so the two sets of labels meet in `compare`. Records files are scanned by key first and only the features shown are parsed, so
the first one shows in a fraction of a second even on a large file.

One feature at a time: its top contexts with the activating tokens highlighted, and its
language shares. Keys: t token, s concept-synonym, m concept-semantic, u uninterpretable,
n skip, b back, q quit. Every answer is appended to --out at once; running the command again
resumes at the first feature without an answer (a later answer for a feature replaces an
earlier one). On a terminal a single key press answers; when stdin is not a terminal (a pipe,
a test) one line is read per answer.
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from autointerp.display import shown
from autointerp.labels import language
from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.files import Kind, expect
from autointerp import options as O
from autointerp.labels.sampling import labelled_sample, parse_count, sample_keys
from autointerp.jsonl import JsonlAppender
from autointerp.records.lean import lean_record, scan_records
from autointerp.schema import GRANULARITIES, FeatureRecord, Key, row_key

CLASS_KEYS = {"t": "token", "s": "concept-synonym", "m": "concept-semantic", "u": "uninterpretable"}
SKIP, BACK, QUIT, HELP = "n", "b", "q", "?"
HELP_TEXT = ("[bold]t[/] token  [bold]s[/] concept-synonym  [bold]m[/] concept-semantic  "
             "[bold]u[/] uninterpretable  ·  [bold]n[/] skip  [bold]b[/] back  [bold]q[/] quit")


def load_answers(path: Path) -> dict[Key, dict[str, Any]]:
    """The answers saved so far, the last line per feature winning; a torn last line is ignored."""
    answers: dict[Key, dict[str, Any]] = {}
    if not path.exists():
        return answers
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                answers[row_key(row)] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # an interrupted write: that feature is simply asked again
    return answers


def _end_with_newline(path: Path) -> None:
    # After an interrupted write the file can end mid-line: start the next answer on its own line.
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def records_files(source: Path) -> list[Path]:
    """A records file itself, or every site's records file of a run folder (RUN/step-N, RUN/layer-L)."""
    if not source.is_dir():
        return [source]
    files = [runlib.records_file(runlib.site_dir(source, s)) for s in runlib.sites(source)]
    files = [f for f in files if f.exists()]
    if not files:
        raise UserError(f"{source}: no step-N/records.jsonl.zst in this folder (run `autointerp collect`)")
    return files


class LazyRecords(Sequence):
    """The records to annotate, picked by key from records files and parsed only when shown (a
    bounded cache serves going back)."""

    def __init__(self, items: list[tuple[Path, Key]], cache_size: int = 256):
        self.items = items
        self.keys = [key for _, key in items]
        self._cache: OrderedDict[int, FeatureRecord] = OrderedDict()
        self.cache_size = cache_size
        self._streams: dict[Path, Iterator] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i in self._cache:
            return self._cache[i]
        path, key = self.items[i]
        record = self._find(path, key)
        self._cache[i] = record
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return record

    def _find(self, path: Path, key: Key) -> FeatureRecord:
        # forward from where this file's stream stopped (the next item is usually the next line),
        # once more from the start when it is behind
        for restart in (False, True):
            if restart or path not in self._streams:
                self._streams[path] = scan_records(path)
            for found, _, line in self._streams[path]:
                if found == key:
                    return lean_record(line.decode("utf-8"))
        raise UserError(f"{path}: feature {key.feature} (step {key.checkpoint_step}) is no longer in the file")


def select(files: list[Path], steps: Sequence[int] = (), features: int | None = None,
           seed: int = 0) -> LazyRecords:
    """The records to ask about: per file all of them in file order, or `features` live ones:
    the latents `label` sampled for its LLM (marked `sampled` in the labels.jsonl beside the
    records; a seeded subset of them when there are more than `features`), else, before any
    `label` run, the plain seeded sample of live latents (label's sample is stratified by the
    statistical class, which needs the labels); only `steps` when given."""
    items: list[tuple[Path, Key]] = []
    for path in files:
        keys, live = [], []
        for key, is_live, _ in scan_records(path):
            keys.append(key)
            if is_live:
                live.append(key)
        live_keys = set(live)
        labelled = [k for k in labelled_sample(path.parent / "labels.jsonl") if k in live_keys] if features else []
        if features is None:
            chosen = keys
        elif labelled:
            chosen = labelled if len(labelled) <= features else sample_keys(labelled, features, seed)
        else:
            chosen = sample_keys(live, features, seed)
        items += [(path, k) for k in chosen if not steps or k.checkpoint_step in steps]
    return LazyRecords(items)


def _level_style(level: int, is_max: bool) -> str:
    if level <= 0 and not is_max:
        return ""
    # white -> orange as the activation level rises
    g, b = int(255 - 12 * level), int(255 - 25 * level)
    return f"black on rgb(255,{g},{max(b, 0)})" + (" bold underline" if is_max else "")


def context_text(context, window: int) -> Text:
    i = context.max_index
    start, end = max(0, i - window), min(len(context.tokens), i + window + 1)
    text = Text("…" if start > 0 else "")
    for j in range(start, end):
        text.append(shown(context.tokens[j], "terminal"), style=_level_style(context.levels[j], j == i))
    if end < len(context.tokens):
        text.append("…")
    return text


def _site_title(record: FeatureRecord) -> str:
    """The checkpoint a latent is at, or its layer in a run of one model's layers."""
    return f"step {record.checkpoint_step}" if record.checkpoint_step is not None else f"layer {record.layer}"


def render_feature(record: FeatureRecord, position: int, total: int, answer: dict | None,
                   n_contexts: int, window: int) -> Panel:
    profile = language.profile(record)
    shares = profile["max_token_scripts"]
    header = Text.assemble(
        (f"{_site_title(record)} · feature {record.feature}", "bold"),
        f"   ({position + 1}/{total})   language: ",
        (str(profile.get("trend", "?")), "bold"),
        "  " + "  ".join(f"{k} {v:.0%}" for k, v in shares.items() if isinstance(v, (int, float))),
    )
    if profile.get("bilingual_firing"):
        header.append("  fires in both scripts", style="cyan")
    if answer is not None:
        header.append(f"\nyour answer: {answer.get('granularity') or 'skipped'}", style="green")
    lines = [context_text(c, window) for c in record.contexts[:n_contexts]]
    if not lines:
        lines = [Text("(no contexts in this record)", style="dim")]
    return Panel(Group(header, Text(""), *lines, Text(""), Text.from_markup(HELP_TEXT, style="dim")),
                 title="autointerp annotate")


def key_reader(stream=None) -> Callable[[], str | None]:
    """A function returning the next key: one key press on a terminal, else one line; None at EOF."""
    stream = stream or sys.stdin
    if stream.isatty():
        import click

        def read_key() -> str | None:
            try:
                return click.getchar().lower()
            except (EOFError, KeyboardInterrupt):
                return None
        return read_key

    def read_line() -> str | None:
        line = stream.readline()
        return None if line == "" else line.strip().lower()
    return read_line


def _parse_key(key: str) -> str:
    """A class name, or SKIP/BACK/QUIT/HELP; full class names are accepted too."""
    if key in CLASS_KEYS:
        return CLASS_KEYS[key]
    if key in GRANULARITIES or key in (SKIP, BACK, QUIT):
        return key
    return HELP


def annotate(records: Sequence[FeatureRecord], out: Path, annotator: str, read_key: Callable[[], str | None],
             console: Console | None = None, n_contexts: int = 8, window: int = 16) -> dict[str, int]:
    """Ask for a label per record (a list, or LazyRecords), appending each answer to `out`;
    returns counts of what was done."""
    console = console or Console()
    answers = load_answers(out)
    keys = records.keys if isinstance(records, LazyRecords) else [r.key for r in records]
    position = next((i for i, k in enumerate(keys) if k not in answers), len(records))
    done = {"labelled": 0, "skipped": 0}
    if position == len(records):
        console.print(f"all {len(records)} features already have an answer in {out}")
    _end_with_newline(out)
    with JsonlAppender(out) as appender:
        while position < len(records):
            record = records[position]
            if console.is_terminal:
                console.clear()
            console.print(render_feature(record, position, len(records), answers.get(record.key),
                                         n_contexts, window))
            key = read_key()
            if key is None or _parse_key(key) == QUIT:
                break
            action = _parse_key(key)
            if action == HELP:
                console.print(f"unknown key {key!r}: {HELP_TEXT}")
                continue
            if action == BACK:
                position = max(0, position - 1)
                continue
            row = {"checkpoint_step": record.checkpoint_step, "layer": record.key.layer, "feature": record.feature,
                   "granularity": None if action == SKIP else action, "annotator": annotator,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            appender.write(row)  # flushed now: a crash loses nothing answered
            answers[record.key] = row
            done["skipped" if action == SKIP else "labelled"] += 1
            position += 1
    remaining = sum(k not in answers for k in keys)
    console.print(f"saved to {out}: {done['labelled']} labelled and {done['skipped']} skipped this session; "
                  f"{remaining} of {len(records)} features without an answer")
    return {**done, "remaining": remaining}


def cli(
    records: Path = typer.Argument(..., metavar="RECORDS",
                                   help="Feature records: a records file (.jsonl, .jsonl.zst, .jsonl.gz) or a run folder."),
    out: Path = typer.Option(..., "--out", metavar="HUMAN_LABELS",
                             help="Where answers are appended (JSONL); resumed if it exists."),
    annotator: str = typer.Option("anonymous", "--annotator", help="Your name, saved with each answer."),
    features: str = O.features_option("to label by hand"),
    steps: list[str] = O.steps_option(),
    contexts: int = O.contexts_option(8),
    window: int = typer.Option(16, "--window", min=1, help="Tokens shown either side of a context's max token."),
) -> None:
    """Label features by hand: t token, s concept-synonym, m concept-semantic, u uninterpretable, n skip, b back, q quit."""
    expect(records, Kind.RECORDS, Kind.RUN)
    if out.exists() and out.stat().st_size:
        expect(out, Kind.HUMAN_LABELS, what="--out")
    selected = select(records_files(records), steps, parse_count(features))
    if not len(selected):
        raise UserError(f"{records}: no feature records" + (f" at steps {', '.join(map(str, steps))}" if steps else "")
                        + ("" if features == "all" else " with contexts"))
    annotate(selected, out, annotator, key_reader(), n_contexts=contexts, window=window)
