"""Statistical labels for every latent of a records file: streamed, on worker processes.

No LLM: the granularity comes from the statistical model and the language from the profile
(granularity.iter_labels). The first HEAD chunks of lines are labelled in this process, which
fills the caches (context languages, token facts, dictionary look-ups) that the workers inherit
when forked. Each worker then reads the file itself, line by line, and labels every W-th chunk
of lines after those (sending a whole SAE's records through pipes cost the parent and the
workers ~10% of the work), GROUP of its chunks at a time (their new context texts in one
langdetect batch: the batch detector's cost is mostly per call). The labels come back as JSON
lines through one pipe per worker and the parent writes them in file order. A worker blocks
while its pipe is full, so memory stays bounded whatever the number of latents (a
32,768-latent checkpoint included).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Iterable, Iterator

from autointerp.labels import decision as granularity
from autointerp.labels import language
from autointerp.errors import UserError
from autointerp.jsonl import iter_lines, to_json_line, write_jsonl
from autointerp.records.lean import lean_record

CHUNK = 32  # latents per task: few enough to share a small file between workers
GROUP = 8  # a worker's chunks labelled at once, in one langdetect batch (most of its cost is per call)


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


# Chunks labelled here before the workers start (a file of no more than that is labelled without
# them): the context texts and tokens that recur across a SAE's latents are then detected and
# looked up once, here, and the forked workers inherit the caches, instead of each filling its own
# (on the synthetic 32,768-latent checkpoint ~1,000 latents show nearly every distinct context).
HEAD = 32
GC_THRESHOLD = (200_000, 50, 1000)  # labelling makes no reference cycles to speak of; a group of
# 256 records in hand is ~60k containers, below the first threshold, so they are not scanned


@contextmanager
def _few_collections():
    """Labelling allocates ~10^5 short-lived objects a latent beside large long-lived caches (the
    langdetect profiles, token and text caches): Python's default collector thresholds spend
    ~25% of the time scanning them. Young objects are collected 30x less often and the old
    generation almost never; the caller's thresholds are restored afterwards. (The workers also
    freeze what they inherit; here that would unfreeze the caller's own frozen objects after.)"""
    old = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*old)


AHEAD = GROUP  # chunks a worker may label before the parent takes them (it waits for the slowest)


def _send_all(conn, outbox: queue.Queue) -> None:
    for item in iter(outbox.get, _STOP):
        try:
            conn.send(item)
        except Exception as exc:  # an exception that does not pickle
            conn.send(RuntimeError(f"{type(item).__name__}: {item}") if isinstance(item, BaseException) else exc)


_STOP = object()


def _label_share(path: str, worker: int, workers: int, chunk: int, skip: int, conn) -> None:
    """A worker: label chunks skip + worker, skip + worker + workers, ... of the file (GROUP of
    them at a time) and send each chunk's label lines; then None (done), or the exception that
    stopped it. A thread sends, so the worker goes on labelling (up to AHEAD chunks) while the
    parent waits for another worker."""
    outbox: queue.Queue = queue.Queue(maxsize=AHEAD)
    sender = threading.Thread(target=_send_all, args=(conn, outbox), daemon=True)
    sender.start()
    try:
        gc.freeze()  # the parent's objects: never scanned (nor their pages copied by the scan)
        gc.set_threshold(*GC_THRESHOLD)
        own = (lines for i, lines in enumerate(_chunks(iter_lines(path, binary=True), chunk))
               if i >= skip and (i - skip) % workers == worker)
        for group in _chunks(own, GROUP):
            labels = iter(label_lines(path, [line for lines in group for line in lines]))
            for lines in group:
                outbox.put(list(islice(labels, len(lines))))
        outbox.put(None)
    except BaseException as exc:  # noqa: BLE001  the parent raises it
        outbox.put(exc)
    finally:
        outbox.put(_STOP)
        sender.join()
        conn.close()


def iter_stat_label_lines(records_path: str | Path, workers: int | None = None,
                          chunk: int = CHUNK) -> Iterator[str]:
    """The statistical label (a JSON line) of every record in the file, in file order: the first
    HEAD chunks here, the rest (if any) on `workers` worker processes."""
    path = str(records_path)
    workers = default_workers() if workers is None else workers
    _warm()
    chunks = _chunks(iter_lines(path, binary=True), chunk)
    for group in _chunks(chunks if workers <= 1 else islice(chunks, HEAD), GROUP):
        with _few_collections():
            labels = label_lines(path, [line for lines in group for line in lines])
        yield from labels
    more = workers > 1 and next(chunks, None) is not None
    chunks.close()
    if not more:
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    conns, procs = [], []
    try:
        for w in range(workers):
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(target=_label_share, args=(path, w, workers, chunk, HEAD, send), daemon=True)
            proc.start()
            send.close()  # the worker holds the sending end: recv() sees EOF if it dies
            conns.append(receive)
            procs.append(proc)
        for i in count():
            try:
                message = conns[i % workers].recv()
            except EOFError:
                raise RuntimeError(f"a label worker died (exit code {procs[i % workers].exitcode})") from None
            if message is None:  # no chunk i: the file is done
                break
            if isinstance(message, BaseException):
                raise message
            yield from message
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for conn in conns:
            conn.close()


def is_live(label: dict) -> bool:
    """Whether a label line's latent fired on the corpus. A dead latent (no contexts) is not a
    class: it gets no label line and is counted apart."""
    return bool((label.get("language_profile") or {}).get("n_contexts"))


@dataclass
class StatLabelCounts:
    labelled: int = 0
    dead: int = 0


def iter_live_labels(records_path: str | Path, counts: StatLabelCounts, workers: int | None = None
                     ) -> Iterator[tuple[str, dict]]:
    """(JSON line, its dict) of every live latent's statistical label, in file order; a dead latent
    gets none and `counts.dead` counts it (`counts.labelled` the others)."""
    for line in iter_stat_label_lines(records_path, workers):
        label = json.loads(line)
        if is_live(label):
            counts.labelled += 1
            yield line, label
        else:
            counts.dead += 1


def write_stat_labels(records_path: str | Path, out_path: str | Path, workers: int | None = None) -> StatLabelCounts:
    """Write the statistical label of every live latent in `records_path` to `out_path` (JSONL,
    atomically); dead latents are counted, not labelled."""
    counts = StatLabelCounts()
    write_jsonl(out_path, (line for line, _ in iter_live_labels(records_path, counts, workers)))
    return counts
