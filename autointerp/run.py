"""A run directory: where every stage reads its input and writes its output.

    RUN/
      manifest.json              what was run, with which versions, seeds and prompt hashes
      lm/step-{N}/               Hugging Face checkpoints (model + tokenizer), N = training step
      step-{N}/sae/              sae.safetensors + config.json (+ metrics.json)
      step-{N}/records.jsonl.zst feature records (top contexts, negatives, density); zstd-compressed
                                 JSONL (a plain records.jsonl is read as well)
      step-{N}/explanations.jsonl
      step-{N}/scores.jsonl
      step-{N}/labels.jsonl
      report/index.html, report/step-{N}.html
      cache.sqlite               LLM response cache
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any

from autointerp import __version__

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(run: str | Path, step: int) -> Path:
    return Path(run) / f"step-{step}"


RECORDS_FILE = "records.jsonl.zst"  # what collect writes
RECORDS_FILES = (RECORDS_FILE, "records.jsonl", "records.jsonl.gz")  # what every reader looks for


def records_file(folder: str | Path) -> Path:
    """A checkpoint folder's records file: the first of RECORDS_FILES that exists, else where
    collect writes it."""
    folder = Path(folder)
    return next((folder / n for n in RECORDS_FILES if (folder / n).is_file()), folder / RECORDS_FILE)


def lm_checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "lm" / f"step-{step}"


def _steps_in(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def lm_checkpoints(run: str | Path) -> list[int]:
    """Training steps with a saved LM checkpoint, ascending."""
    return _steps_in(Path(run) / "lm")


def checkpoint_steps(run: str | Path) -> list[int]:
    """Steps with a per-checkpoint stage folder (step-N/), ascending."""
    return _steps_in(Path(run))


def read_manifest(run: str | Path) -> dict[str, Any]:
    path = Path(run) / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def update_manifest(run: str | Path, stage: str, info: dict[str, Any]) -> None:
    """Record what a stage did (its arguments, versions, seeds, hashes, timing) in manifest.json."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(run)
    manifest.setdefault("autointerp_version", __version__)
    manifest.setdefault("python", platform.python_version())
    manifest.setdefault("stages", {})[stage] = {**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = run / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
    tmp.replace(run / "manifest.json")
