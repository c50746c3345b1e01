"""llm-jp-sae's demo data (docs/data/{step}/{i}.json) as feature records, its human labels in extra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autointerp.errors import UserError
from autointerp.labels.language import trend_from_counts
from autointerp.schema import LLMJP_GRANULARITY_CODES, Context, FeatureRecord

# llm-jp-sae's docs/main.js: 1 Uninterpretable, 2 Concept (semantic sim.), 3 Concept (synonymy), 4 Token
LLMJP_GRANULARITY = LLMJP_GRANULARITY_CODES
LLMJP_MODEL, LLMJP_LAYER = "llm-jp/llm-jp-3-1.8b", 12


def language_trend(counts: dict[str, int]) -> str:
    """The paper's rule (docs/main.js) over its en/ja counts: en or ja when over 90% agree, else mix."""
    return trend_from_counts({"en": int(counts.get("en", 0)), "ja": int(counts.get("ja", 0))})


def _llmjp_record(path: Path, step: int | None) -> FeatureRecord:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        contexts = [Context(tokens=[str(t) for t, _ in sent], levels=[int(a) for _, a in sent])
                    for sent in data["token_act"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an llm-jp-sae feature file ({type(exc).__name__}: {exc})") from None
    extra: dict[str, Any] = {"source": "llm-jp/llm-jp-sae docs/data"}
    code = data.get("granularity")
    if code is not None:
        if int(code) not in LLMJP_GRANULARITY:
            raise UserError(f"{path}: unknown granularity code {code!r} (expected 1..4)")
        extra["human_granularity"] = LLMJP_GRANULARITY[int(code)]
        extra["human_granularity_code"] = int(code)
    if isinstance(data.get("language"), dict):
        counts = {"en": int(data["language"].get("en", 0)), "ja": int(data["language"].get("ja", 0))}
        extra["language_counts"] = counts
        extra["language_trend"] = language_trend(counts)
    return FeatureRecord(model=LLMJP_MODEL, layer=LLMJP_LAYER, checkpoint_step=step, feature=int(path.stem),
                         contexts=contexts, extra=extra)


def import_llmjp_demo(path: str | Path) -> list[FeatureRecord]:
    """Read llm-jp-sae's demo data: `docs/data/{step}/{i}.json` ({"token_act": [[[token, level], ...],
    ...], "language": {"en", "ja"}, "granularity": 1..4}). `path` is the data folder (step
    subfolders), one step folder, or one feature file. Sorted by (step, feature)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        step = int(path.parent.name) if path.parent.name.isdigit() else None
        return [_llmjp_record(path, step)]
    step_dirs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    pairs = [(int(d.name), f) for d in step_dirs for f in d.glob("*.json")] if step_dirs else \
        [(int(path.name) if path.name.isdigit() else None, f) for f in path.glob("*.json")]
    pairs = [(s, f) for s, f in pairs if f.stem.isdigit()]
    if not pairs:
        raise UserError(f"{path}: no llm-jp-sae feature files ({{step}}/{{i}}.json) found")
    pairs.sort(key=lambda sf: (sf[0] if sf[0] is not None else -1, int(sf[1].stem)))
    return [_llmjp_record(f, s) for s, f in pairs]
