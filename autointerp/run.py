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
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autointerp import __version__
from autointerp.errors import UserError

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
        if records_file(target).is_file():
            return resolve_targets(records_file(target))
        found = [records_file(step_dir(target, s)) for s in checkpoint_steps(target)]
        found = [p for p in found if p.is_file()]
        if found:
            return [Target(p, p.parent, target) for p in found]
        raise UserError(f"{target}: no step-N records file inside (run `autointerp collect` first)")
    raise UserError(f"{target}: no such records file or run directory")


# --------------------------------------------------------------------------- paths saved in run files
# A run folder can be moved or opened from any working directory: a path that a run file stores
# (the SAE config's model, the manifest's files and corpus) is relative to the folder of that file
# when it lies inside the run, absolute when it lies outside, and resolved against that folder on
# load. Older runs stored paths as given (absolute or relative to the working directory then):
# those still load (see resolve_model).

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def saved_path(value: str | Path, base: str | Path, root: str | Path | None = None) -> str:
    """How a run file at folder `base` stores `value`: an existing local path relative to `base`
    when it lies inside `root` (default `base`), else absolute; anything else (a Hugging Face
    id, a corpus name) unchanged."""
    path = Path(value)
    if not path.exists():
        return str(value)
    target, root_abs = path.resolve(), Path(root if root is not None else base).resolve()
    if target == root_abs or root_abs in target.parents:
        return Path(os.path.relpath(target, Path(base).resolve())).as_posix()
    return str(target)


def load_saved(value: str | None, base: str | Path) -> str | None:
    """A path saved by saved_path, read back by a process in any working directory: relative to
    `base` when it exists there, else unchanged (absolute, an old cwd-relative path, or a name)."""
    if not value:
        return value
    path = Path(value)
    if not path.is_absolute() and (Path(base) / path).exists():
        return os.path.normpath(Path(base) / path)
    return str(value)


def resolve_model(value: str | None, sae_dir: str | Path) -> str | None:
    """The language model an SAE config names (its `model`), as a path that exists or a Hugging
    Face id; a UserError naming the paths tried (and suggesting --model) when it is neither.

    Tried in order: relative to the SAE folder (how `sae train RUN_DIR` saves it), absolute or
    relative to the working directory (older runs), and for an SAE at RUN/step-N/sae whose saved
    path ends in lm/step-N, RUN/lm/step-N (an old run moved or opened from elsewhere)."""
    if not value:
        return None
    sae_dir = Path(sae_dir)
    path = Path(value)
    tried = [path] if path.is_absolute() else [Path(os.path.normpath(sae_dir / path)), path]
    step = sae_dir.parent
    if _STEP_DIR.match(step.name) and path.name == step.name and path.parent.name == "lm":
        tried.append(step.parent / "lm" / step.name)
    for candidate in dict.fromkeys(tried):
        if candidate.exists():
            return str(candidate)
    if not path.is_absolute() and _HUB_ID.match(str(value)) and not str(value).startswith("."):
        return str(value)  # a Hugging Face id
    shown = ", ".join(str(c if c.is_absolute() else f"./{c}") for c in dict.fromkeys(tried))
    raise UserError(f"{sae_dir}: the SAE was trained on the model at {value!r}, which is not there "
                    f"(tried {shown}); pass --model with the model's folder or Hugging Face id")
