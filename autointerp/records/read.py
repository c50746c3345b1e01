"""Reading records files: every record, parsed whole (records.lean reads part of each, faster)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from autointerp.jsonl import OnError, iter_jsonl
from autointerp.schema import FeatureRecord


def stream_records(path: str | Path, on_error: OnError = "fail", warn=None) -> Iterator[FeatureRecord]:
    """The feature records of a records file (plain, .gz or .zst), one at a time."""
    return iter_jsonl(path, FeatureRecord.from_dict, on_error, warn)


def read_records(path: str | Path, on_error: OnError = "fail", warn=None) -> list[FeatureRecord]:
    return list(stream_records(path, on_error, warn))
