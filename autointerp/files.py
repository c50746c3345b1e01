"""What a file or folder given on the command line holds, and one line saying so when it is not
what the command reads.

    kind = detect_kind(path)                        # Kind.RECORDS, Kind.LABELS, Kind.RUN, ...
    path = expect(path, Kind.RECORDS, Kind.RUN)     # the path, or a UserError such as
    # "runs/demo/step-600/labels.jsonl holds labels, not feature records or a run folder;
    #  records are in runs/demo/step-600/records.jsonl.zst"

A JSONL file (plain, .gz or .zst) is told by the fields of its first line, a folder by what it
contains; nothing else is read, so a check costs milliseconds even on a large records file.
Light on purpose (no torch): every command calls it before its heavy imports.
"""

from __future__ import annotations

import csv
import json
from enum import Enum
from pathlib import Path
from typing import Any

from autointerp import run as runlib
from autointerp.errors import UserError

_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class Kind(Enum):
    """What a path holds. The value is the noun used in messages."""

    RECORDS = "feature records"
    HUMAN_RECORDS = "feature records with human labels"
    LABELS = "labels"
    HUMAN_LABELS = "human labels"
    EXPLANATIONS = "explanations"
    SCORES = "scores"
    LINEAGE = "lineage rows"
    LLMJP_DEMO = "llm-jp-sae demo data"
    SAE = "an SAE folder"
    LM = "a language-model checkpoint"
    LM_CHECKPOINTS = "a folder of language-model checkpoints"
    RUN = "a run folder"
    CHECKPOINT = "a checkpoint folder"
    EMPTY = "nothing"
    UNKNOWN = "something autointerp does not read"
    MISSING = "no such file or folder"

    @property
    def is_folder(self) -> bool:
        return self in (Kind.SAE, Kind.LM, Kind.LM_CHECKPOINTS, Kind.RUN, Kind.CHECKPOINT)


# A found kind that also serves as another: the shared dev file is records and human labels.
_ALSO = {Kind.HUMAN_RECORDS: {Kind.RECORDS, Kind.HUMAN_LABELS}}


# --------------------------------------------------------------------------- detection

def sae_format(folder: Path) -> str | None:
    """The SAE format of a folder by its file names (autointerp, llm-jp-sae, saelens, sparsify,
    pickle:NAME), or None. sae.io.load_sae reads what this names."""
    d = Path(folder)
    if not d.is_dir():
        return None
    if (d / "config.json").exists() and (d / "sae.safetensors").exists():
        return "autointerp"
    if (d / "config.json").exists() and (d / "model.safetensors").exists() and not _is_lm_config(d / "config.json"):
        return "llm-jp-sae"
    if (d / "cfg.json").exists() and (d / "sae_weights.safetensors").exists():
        return "saelens"
    if (d / "cfg.json").exists() and (d / "sae.safetensors").exists():
        return "sparsify"
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not _is_lm_config(d / "config.json"):  # a Hugging Face LM's pytorch_model.bin is no SAE
        return "pickle:" + pickles[0]
    return None


def _is_lm_config(path: Path) -> bool:
    """A Hugging Face model config (architectures / model_type), not an SAE's."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg) \
        and cfg.get("model_type") != "topk_sae" and "d_in" not in cfg


def _is_lm(folder: Path) -> bool:
    return (folder / "config.json").exists() and _is_lm_config(folder / "config.json") \
        and any(any(folder.glob(p)) for p in _WEIGHTS)


def llmjp_data_dir(path: Path) -> Path | None:
    """docs/data of an llm-jp-sae checkout (or that folder, or one of its step folders), if `path` is one."""
    for candidate in (path / "docs" / "data", path / "data", path):
        if not candidate.is_dir():
            continue
        steps = [p for p in candidate.iterdir() if p.is_dir() and p.name.isdigit()]
        if steps and any(next(p.glob("*.json"), None) for p in steps):
            return candidate
    if path.is_dir() and path.name.isdigit() and any(p.stem.isdigit() for p in path.glob("*.json")):
        return path
    return None


def _step_dirs(folder: Path) -> list[Path]:
    """The step-N folders in a folder (LM checkpoints of `lm train`)."""
    return [runlib.site_dir(folder, s) for s in runlib.sites(folder) if s.layer is None]


def _site_dirs(folder: Path) -> list[Path]:
    return [runlib.site_dir(folder, s) for s in runlib.sites(folder)]


def _is_checkpoint(folder: Path) -> bool:
    """A run's site folder (step-N, layer-L): it holds a stage's output (records, labels, an SAE, ...)."""
    return runlib.Site.parse(folder.name) is not None and (
        any((folder / n).is_file() for n in runlib.RECORDS_FILES)
        or any((folder / n).exists() for n in ("sae", "labels.jsonl", "explanations.jsonl", "scores.jsonl")))


def _is_run(folder: Path) -> bool:
    if (folder / "manifest.json").is_file():
        return True
    if (folder / "lm").is_dir() and any(_is_lm(p) for p in _step_dirs(folder / "lm")):
        return True
    return any(_is_checkpoint(p) for p in _site_dirs(folder))


def _folder_kind(folder: Path) -> tuple[Kind, str]:
    if sae_format(folder):
        return Kind.SAE, ""
    if _is_lm(folder):
        return Kind.LM, ""
    if _is_checkpoint(folder):
        return Kind.CHECKPOINT, ""
    if _is_run(folder):
        return Kind.RUN, ""
    if any(_is_lm(p) for p in _step_dirs(folder)):
        return Kind.LM_CHECKPOINTS, ""
    if llmjp_data_dir(folder) is not None:
        return Kind.LLMJP_DEMO, ""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return Kind.EMPTY, "an empty folder"
    shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
    return Kind.UNKNOWN, f"a folder holding {shown}"


def _row_kind(row: Any) -> tuple[Kind, str]:
    """The kind of a JSONL file from its first object."""
    if not isinstance(row, dict):
        return Kind.UNKNOWN, f"JSON lines that are not objects ({type(row).__name__})"
    if "token_act" in row:
        return Kind.LLMJP_DEMO, ""
    if "feature" not in row:
        return Kind.UNKNOWN, "JSON lines without a 'feature' field (fields: " + ", ".join(list(row)[:8]) + ")"
    if "contexts" in row:
        human = "human_granularity" in row or "human_granularity_code" in row
        return (Kind.HUMAN_RECORDS if human else Kind.RECORDS), ""
    if "parent_feature" in row or "parent_step" in row:
        return Kind.LINEAGE, ""
    if any(k in row for k in ("simulation", "detection", "fuzzing", "simulator")):
        return Kind.SCORES, ""
    if "granularity" in row:
        if "language_profile" in row or "scores" in row:
            return Kind.LABELS, ""
        if "explainer" in row:
            return Kind.EXPLANATIONS, ""
        return Kind.HUMAN_LABELS, ""
    return Kind.UNKNOWN, "JSON lines with fields " + ", ".join(list(row)[:8])


def _file_kind(path: Path) -> tuple[Kind, str]:
    from autointerp.jsonl import iter_lines

    name = path.name.lower()
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            header = [c.strip().lower() for c in next(csv.reader(fh), [])]
        if "granularity" in header and "feature" in header:
            return Kind.HUMAN_LABELS, ""
        return Kind.UNKNOWN, "a CSV with columns " + ", ".join(header) if header else "an empty CSV"
    if name.endswith(".safetensors"):
        return (Kind.SAE, "") if sae_format(path.parent) else (Kind.UNKNOWN, "a safetensors file outside an SAE folder")
    if path.suffix == ".json" and path.stem.isdigit():  # one llm-jp-sae feature file
        return Kind.LLMJP_DEMO, ""
    try:
        first = next(iter_lines(path), None)
    except UserError as exc:
        return Kind.UNKNOWN, str(exc).split(": ", 1)[-1]
    except OSError as exc:
        return Kind.UNKNOWN, f"an unreadable file ({exc.strerror or exc})"
    if first is None:
        return Kind.EMPTY, "an empty file"
    try:
        row = json.loads(first[1])
    except ValueError:
        return Kind.UNKNOWN, "text that is not JSON lines"
    return _row_kind(row)


def _detect(path: Path) -> tuple[Kind, str]:
    if not path.exists():
        return Kind.MISSING, ""
    return _folder_kind(path) if path.is_dir() else _file_kind(path)


def detect_kind(path: str | Path) -> Kind:
    """What `path` holds, from a JSONL file's first line or a folder's contents."""
    return _detect(Path(path))[0]


# --------------------------------------------------------------------------- expectations

def _run_of(path: Path) -> Path | None:
    """The run folder `path` lies in (itself included), looking up to three levels."""
    for folder in [path, *list(path.parents)[:3]]:
        if folder.is_dir() and _is_run(folder):
            return folder
    return None


def _pointer(path: Path, found: Kind, wanted: tuple[Kind, ...]) -> str:
    """Where the wanted thing is, when the path sits in a run that has it."""
    folder = path if path.is_dir() else path.parent
    checkpoint = folder if _is_checkpoint(folder) else (folder.parent if _is_checkpoint(folder.parent) else None)
    run = _run_of(folder)
    for kind in wanted:
        if kind in (Kind.RECORDS, Kind.HUMAN_RECORDS):
            if checkpoint is not None and runlib.records_file(checkpoint).exists():
                return f"records are in {runlib.records_file(checkpoint)}"
            if run is not None:
                files = [runlib.records_file(d) for d in _site_dirs(run) if runlib.records_file(d).exists()]
                if files:
                    return f"records are in {_listed(files)}"
        elif kind == Kind.LABELS:  # labels.jsonl holds model labels
            if checkpoint is not None and (checkpoint / "labels.jsonl").exists() and path != checkpoint / "labels.jsonl":
                return f"labels are in {checkpoint / 'labels.jsonl'}"
        elif kind == Kind.SAE:
            if checkpoint is not None and sae_format(checkpoint / "sae"):
                return f"its SAE is {checkpoint / 'sae'}"
            if found == Kind.LM and run is not None and sae_format(run / folder.name / "sae"):
                return f"the SAE of this checkpoint is {run / folder.name / 'sae'}"
            if run is not None:
                saes = [d / "sae" for d in _site_dirs(run) if sae_format(d / "sae")]
                if saes:
                    return f"SAEs are in {_listed(saes)}"
        elif kind == Kind.RUN and run is not None and run != path:
            return f"the run folder is {run}"
        elif (kind == Kind.RUN and run is None and path.is_dir() and not runlib.Site.parse(path.name)
              and runlib.records_file(path).is_file()):  # one SAE's folder, as `label SAE_DIR --out` writes it
            return f"move them into a site folder, e.g. {path}/layer-L/, to make it a run"
    if found in (Kind.RECORDS, Kind.HUMAN_RECORDS) and {Kind.LABELS, Kind.HUMAN_LABELS} & set(wanted):
        return "`autointerp label` writes model labels, `autointerp annotate` human ones"
    return ""


def _listed(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:3])
    return shown + (f" (and {len(paths) - 3} more)" if len(paths) > 3 else "")


def _accepts(found: Kind, wanted: tuple[Kind, ...]) -> bool:
    return found in wanted or bool(_ALSO.get(found, set()) & set(wanted))


def _nouns(kinds: tuple[Kind, ...]) -> str:
    nouns = list(dict.fromkeys(k.value for k in kinds))
    return nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " or " + nouns[-1]


def expect(path: str | Path, *wanted: Kind, what: str | None = None, expected: str | None = None) -> Path:
    """`path` if it holds one of the `wanted` kinds, else a UserError naming what it holds, what
    was expected and, when the path sits in a run, where the expected thing is.

    `what` names the argument in the message (e.g. "--out") when that helps; `expected` says in
    words what is read, when the list of kinds is long."""
    path = Path(path)
    found, detail = _detect(path)
    if _accepts(found, wanted):
        return path
    label = f"{what} {path}" if what else str(path)
    expected = expected or _nouns(wanted)
    if found == Kind.MISSING:
        message = f"{label}: no such file or folder (expected {expected})"
    else:
        holds = detail or found.value
        verb = "is" if (found.is_folder or detail.startswith(("a ", "an "))) else "holds"
        message = f"{label} {verb} {holds}, not {expected}"
    pointer = _pointer(path, found, wanted)
    raise UserError(f"{message}; {pointer}" if pointer else message)
