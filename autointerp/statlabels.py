"""Statistical labels for every latent of a records file: streamed, on worker processes.

No LLM: the granularity comes from the statistical model and the language from the profile
(granularity.iter_labels). The file is read line by line; chunks of raw lines go to the workers
(cheap to send), each worker parses and labels its chunk, and the labels come back as JSON lines,
in order, to one writer. At most 2 chunks per worker are in flight, so memory stays bounded
whatever the number of latents (a 32,768-latent checkpoint included).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from autointerp import granularity, language
from autointerp.errors import UserError
from autointerp.schema import iter_lines, lean_record, to_json_line, write_jsonl

CHUNK = 32  # latents per task: enough to batch langdetect, few enough to share a small file between workers


def label_lines(path: str, lines: list[tuple[int, bytes]]) -> list[str]:
    """The label JSON lines of raw record lines ((line number, line) of `path`, for errors)."""
    records = []
    for lineno, line in lines:
        try:
            records.append(lean_record(line))  # a label rests on the top contexts alone
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}:{lineno}: malformed line ({type(exc).__name__}: {exc})") from None
    return [to_json_line(label) for label in granularity.iter_labels(records)]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _warm() -> None:
    # loaded once in the parent, so forked workers share them (copy-on-write) instead of each loading them
    granularity.load_models()
    language.detect_languages(["warm up"])


def iter_stat_label_lines(records_path: str | Path, workers: int | None = None,
                          chunk: int = CHUNK) -> Iterator[str]:
    """The statistical label (a JSON line) of every record in the file, in file order."""
    path = str(records_path)
    chunks = _chunks(iter_lines(records_path, binary=True), chunk)  # the parent only reads
    workers = default_workers() if workers is None else workers
    _warm()
    if workers <= 1:
        for lines in chunks:
            yield from label_lines(path, lines)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque = deque()
        for lines in chunks:
            pending.append(pool.submit(label_lines, path, lines))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def write_stat_labels(records_path: str | Path, out_path: str | Path, workers: int | None = None,
                      on_label: Callable[[], None] | None = None) -> int:
    """Write the statistical label of every latent in `records_path` to `out_path` (JSONL,
    atomically); returns the number of labels."""
    lines = iter_stat_label_lines(records_path, workers)
    if on_label is not None:
        lines = _counted(lines, on_label)
    return write_jsonl(out_path, lines)


def _counted(lines: Iterator[str], on_label: Callable[[], None]) -> Iterator[str]:
    for line in lines:
        on_label()
        yield line
