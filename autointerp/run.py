"""A run directory: where every stage reads its input and writes its output.

    RUN/
      manifest.json              what was run, with which versions, seeds and prompt hashes
      lm/step-{N}/               Hugging Face checkpoints (model + tokenizer), N = training step
      SITE/sae/                  sae.safetensors + config.json (+ metrics.json)
      SITE/records.jsonl.zst     feature records (top contexts, negatives, density); zstd-compressed
                                 JSONL (a plain records.jsonl is read as well)
      SITE/lineage.jsonl         each latent's parent at the previous site
      SITE/explanations.jsonl
      SITE/scores.jsonl
      SITE/labels.jsonl
      report/index.html, report/SITE.html
      cache.sqlite               LLM response cache

SITE is where an SAE reads the model: step-{N} (a training checkpoint), layer-{L} (a layer of
one model) or step-{N}-layer-{L}.
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

_SITE_DIR = re.compile(r"^(?:step-(?P<step>\d+)(?:-|$))?(?:layer-(?P<layer>\d+))?$")
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Site:
    """Where one SAE reads a language model: a training checkpoint, a layer, or both. A run folder
    holds one subfolder per site: step-N (checkpoints of one layer), layer-L (layers of one
    model), step-N-layer-L (both)."""

    step: int | None = None
    layer: int | None = None

    @property
    def name(self) -> str:
        parts = ([f"step-{self.step}"] if self.step is not None else []) + \
                ([f"layer-{self.layer}"] if self.layer is not None else [])
        return "-".join(parts)

    @property
    def title(self) -> str:
        """How a page or a table names it: "step 600", "layer 6", "step 600, layer 6"."""
        return self.name.replace("-", " ").replace(" layer", ", layer")

    def sort_key(self) -> tuple[int, int]:
        return (-1 if self.step is None else self.step, -1 if self.layer is None else self.layer)

    @classmethod
    def parse(cls, name: str) -> "Site | None":
        m = _SITE_DIR.match(name)
        if not m or name.endswith("-") or not (m["step"] or m["layer"]):
            return None
        return cls(None if m["step"] is None else int(m["step"]), None if m["layer"] is None else int(m["layer"]))


def site_dir(run: str | Path, site: Site) -> Path:
    return Path(run) / site.name


def step_dir(run: str | Path, step: int) -> Path:
    return site_dir(run, Site(step=step))


def sites(run: str | Path) -> list[Site]:
    """The sites with a stage folder in the run (step-N/, layer-L/, step-N-layer-L/), in order:
    by step, then by layer."""
    folder = Path(run)
    if not folder.is_dir():
        return []
    found = (Site.parse(p.name) for p in folder.iterdir() if p.is_dir())
    return sorted((s for s in found if s is not None), key=Site.sort_key)


def lineage_pairs(found: list[Site]) -> list[tuple[Site, Site]]:
    """Consecutive sites that lineage matches: each checkpoint against the previous one at the
    same layer, and, in a run of one checkpoint (or none), each layer against the previous one."""
    by_layer: dict[int | None, list[Site]] = {}
    for site in found:
        by_layer.setdefault(site.layer, []).append(site)
    pairs = [(a, b) for group in by_layer.values() for a, b in zip(group, group[1:]) if a.step != b.step]
    if not pairs:
        by_step: dict[int | None, list[Site]] = {}
        for site in found:
            by_step.setdefault(site.step, []).append(site)
        pairs = [(a, b) for group in by_step.values() for a, b in zip(group, group[1:])]
    return sorted(pairs, key=lambda p: p[1].sort_key())


RECORDS_FILE = "records.jsonl.zst"  # what collect writes
RECORDS_FILES = (RECORDS_FILE, "records.jsonl", "records.jsonl.gz")  # what every reader looks for


def records_file(folder: str | Path) -> Path:
    """A site folder's records file: the first of RECORDS_FILES that exists, else where
    collect writes it."""
    folder = Path(folder)
    return next((folder / n for n in RECORDS_FILES if (folder / n).is_file()), folder / RECORDS_FILE)


def lm_checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "lm" / f"step-{step}"


def lm_checkpoints(run: str | Path) -> list[int]:
    """Training steps with a saved LM checkpoint, ascending."""
    folder = Path(run) / "lm"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def checkpoint_steps(run: str | Path) -> list[int]:
    """Steps with a per-checkpoint stage folder (step-N/), ascending."""
    return [s.step for s in sites(run) if s.step is not None and s.layer is None]


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
    """A records.jsonl file, a site folder (step-N, layer-L), or a run directory (every site's records)."""
    target = Path(target)
    if target.is_file():
        folder = target.parent
        run_dir = folder.parent if Site.parse(folder.name) else folder
        return [Target(target, folder, run_dir)]
    if target.is_dir():
        if records_file(target).is_file():
            return resolve_targets(records_file(target))
        found = [records_file(site_dir(target, s)) for s in sites(target)]
        found = [p for p in found if p.is_file()]
        if found:
            return [Target(p, p.parent, target) for p in found]
        raise UserError(f"{target}: no step-N (or layer-L) records file inside (run `autointerp collect` first)")
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
