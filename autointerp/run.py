"""A run directory: where every stage reads its input and writes its output.

    RUN/
      manifest.json              what was run, with which versions, seeds and prompt hashes
      lm/step-{N}/               Hugging Face checkpoints (model + tokenizer), N = training step
      step-{N}/sae/              sae.safetensors + config.json (+ metrics.json)
      step-{N}/records.jsonl     feature records (top contexts, negatives, density)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autointerp import __version__

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(run: str | Path, step: int) -> Path:
    return Path(run) / f"step-{step}"


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


@dataclass
class Target:
    """One checkpoint's records file and where its stage outputs go."""

    records_path: Path
    folder: Path  # explanations/scores/labels.jsonl go here: next to records.jsonl
    run_dir: Path  # manifest.json and cache.sqlite live here


def resolve_targets(target: Path) -> list[Target]:
    """A records.jsonl file, a step-N folder, or a run directory (every step-N/records.jsonl)."""
    from autointerp.errors import UserError

    target = Path(target)
    if target.is_file():
        folder = target.parent
        run_dir = folder.parent if _STEP_DIR.match(folder.name) else folder
        return [Target(target, folder, run_dir)]
    if target.is_dir():
        if (target / "records.jsonl").is_file():
            return resolve_targets(target / "records.jsonl")
        found = [step_dir(target, s) / "records.jsonl" for s in checkpoint_steps(target)]
        found = [p for p in found if p.is_file()]
        if found:
            return [Target(p, p.parent, target) for p in found]
        raise UserError(f"{target}: no step-N/records.jsonl inside (run `autointerp collect` first)")
    raise UserError(f"{target}: no such records file or run directory")


def sample_live(records: list, n: int, seed: int = 0) -> list:
    """A seeded random sample of n latents that have contexts, in feature order (stable across
    reruns): what `label --features N` and `score --features N` work on."""
    import random

    live = [r for r in records if r.contexts]
    chosen = random.Random(seed).sample(live, min(n, len(live)))
    return sorted(chosen, key=lambda r: r.feature)
