"""Reading records: a records file (plain, .gz or .zst) or llm-jp-sae demo data, every record
parsed whole (records.lean reads part of each, faster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from autointerp.errors import UserError
from autointerp.jsonl import OnError, iter_jsonl
from autointerp.records.llmjp import import_llmjp_demo
from autointerp.schema import FeatureRecord


def stream_records(path: str | Path, on_error: OnError = "fail",
                   warn: Callable[[str], None] | None = None) -> Iterator[FeatureRecord]:
    """Records, one at a time, from a records file (JSONL plain, .gz or .zst: this project's or
    the shared dev file; extras such as human labels are kept in .extra) or from an llm-jp-sae
    demo folder/file."""
    if _llmjp_demo(Path(path)):
        return iter(import_llmjp_demo(path))
    _check_on_error(on_error)
    return iter_jsonl(path, FeatureRecord.from_dict, on_error, warn)


def read_records(path: str | Path, on_error: OnError = "fail",
                 warn: Callable[[str], None] | None = None) -> list[FeatureRecord]:
    """stream_records(...) as a list."""
    return list(stream_records(path, on_error, warn))


def find_records(path: str | Path, feature: int, step: int | None = None, on_error: OnError = "fail",
                 warn: Callable[[str], None] | None = None) -> list[FeatureRecord]:
    """The records of one latent (at one step, or all steps) in a records file or llm-jp-sae
    folder; only the matching lines are turned into dataclasses, so large files read fast."""
    path = Path(path)
    if _llmjp_demo(path):
        records: Iterable[FeatureRecord] = import_llmjp_demo(path)
    else:
        _check_on_error(on_error)

        def parse(d: dict[str, Any]) -> FeatureRecord | None:
            hit = int(d["feature"]) == feature and (step is None or d.get("checkpoint_step") == step)
            return FeatureRecord.from_dict(d) if hit else None

        records = (r for r in iter_jsonl(path, parse, on_error, warn) if r is not None)  # type: ignore[arg-type]
    return [r for r in records if r.feature == feature and (step is None or r.checkpoint_step == step)]


def _llmjp_demo(path: Path) -> bool:
    """llm-jp-sae demo data: a data or step folder, or one feature file ({i}.json)."""
    return path.is_dir() or (path.suffix == ".json" and path.stem.isdigit())


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "fail"):
        raise UserError(f"--on-error must be skip or fail, not {on_error!r}")
