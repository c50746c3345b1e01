"""Compare two sets of granularity labels (e.g. human vs model): Cohen's kappa, confusion, P/R/F1.

    autointerp compare HUMAN MODEL [--out PREFIX]

HUMAN and MODEL can each be any of:
  - a label JSONL file (schema.Label, or `autointerp annotate` output),
  - a feature-record JSONL file with human fields (the shared dev file: extra["human_granularity"]),
  - a run directory (every RUN/step-N/labels.jsonl),
  - the llm-jp-sae demo JSON directory (docs/data/{step}/{i}.json with `granularity` codes 1-4),
  - a CSV with columns feature, checkpoint (or checkpoint_step), granularity.
Labels are joined on (checkpoint_step, feature); features in one input only are counted and left out.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.files import Kind, expect, llmjp_data_dir
from autointerp.jsonl import iter_jsonl
from autointerp.schema import GRANULARITIES, LLMJP_GRANULARITY_CODES, Key, three_way

# What compare reads on either side (the explainer's votes too); feature records need human fields.
LABEL_KINDS = (Kind.LABELS, Kind.HUMAN_LABELS, Kind.HUMAN_RECORDS, Kind.EXPLANATIONS, Kind.RUN, Kind.LLMJP_DEMO)
THREE_WAY = ("token", "concept", "uninterpretable")
SHORT_NAMES = {"token": "token", "concept-synonym": "synonym", "concept-semantic": "semantic",
               "uninterpretable": "uninterp."}

# The llm-jp-sae demo's codes (docs/main.js): 1 Uninterpretable, 2 Concept (semantic similarity),
# 3 Concept (synonymy), 4 Token-level.
_ALIASES = {
    "token-level": "token", "concept-synonymy": "concept-synonym", "synonym": "concept-synonym",
    "synonymy": "concept-synonym", "concept-syn": "concept-synonym", "concept-level (synonymy)": "concept-synonym",
    "semantic": "concept-semantic", "concept-sem": "concept-semantic",
    "concept-level (semantic sim.)": "concept-semantic", "concept-level (semantic similarity)": "concept-semantic",
    "uninterp": "uninterpretable", "none": "uninterpretable",
}


def normalize_granularity(value: Any) -> str | None:
    """One of GRANULARITIES from a name, an alias or an llm-jp-sae code; None for no label."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        code = int(value)
        if code not in LLMJP_GRANULARITY_CODES:
            raise ValueError(f"unknown granularity code {value!r} (llm-jp-sae codes are 1-4)")
        return LLMJP_GRANULARITY_CODES[code]
    name = str(value).strip().lower().replace("_", "-")
    name = _ALIASES.get(name, name)
    if name not in GRANULARITIES:
        raise ValueError(f"unknown granularity {value!r} (expected one of {', '.join(GRANULARITIES)})")
    return name


@dataclass
class LabelSet:
    """Granularity labels keyed by latent (Key), with descriptions where known."""

    source: str
    labels: dict[Key, str] = field(default_factory=dict)
    descriptions: dict[Key, str] = field(default_factory=dict)
    unlabelled: int = 0  # entries without a granularity (skipped, failed): not compared

    def add(self, step: Any, feature: Any, granularity: Any, description: Any = None, layer: Any = None) -> None:
        key = Key(None if step in (None, "") else int(step), None if layer in (None, "") or int(layer) < 0 else int(layer),
                  int(feature))
        name = normalize_granularity(granularity)
        if name is None:
            self.unlabelled += 1
            return
        self.labels[key] = name  # a later line wins (annotate appends corrections)
        if description:
            self.descriptions[key] = str(description)


def _load_jsonl(path: Path, out: LabelSet) -> None:
    def add(row: Any) -> None:
        if not isinstance(row, dict) or "feature" not in row:
            raise ValueError("a label line needs 'feature' (and 'checkpoint_step', 'granularity')")
        if "contexts" in row:  # a feature record: the human fields of the shared dev file
            granularity = row.get("human_granularity", row.get("human_granularity_code"))
        else:
            granularity = row.get("granularity")
        out.add(row.get("checkpoint_step"), row["feature"], granularity, row.get("description"), row.get("layer"))

    for _ in iter_jsonl(path, add, fail_hint=""):  # a bad line: UserError naming file:line
        pass


def _load_csv(path: Path, out: LabelSet) -> None:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        step_col = columns.get("checkpoint") or columns.get("checkpoint_step") or columns.get("step")
        if "feature" not in columns or "granularity" not in columns or step_col is None:
            raise UserError(f"{path}: a label CSV needs the columns feature, checkpoint, granularity "
                            f"(found {', '.join(columns) or 'none'})")
        for i, row in enumerate(reader, 2):
            try:
                out.add(row[step_col], row[columns["feature"]], row[columns["granularity"]],
                        row.get(columns.get("description", ""), None), row.get(columns.get("layer", ""), None))
            except ValueError as exc:
                raise UserError(f"{path}:{i}: {exc}") from None


def _load_llmjp_demo(data_dir: Path, out: LabelSet) -> None:
    from autointerp.records.llmjp import import_llmjp_demo

    for record in import_llmjp_demo(data_dir):
        out.add(record.checkpoint_step, record.feature, record.extra.get("human_granularity"), layer=record.layer)


def load_labels(source: str | Path) -> LabelSet:
    """Read granularity labels from any supported input (see the module docstring)."""
    path = Path(source)
    if path.suffix.lower() != ".csv":  # a CSV's columns are checked by _load_csv
        expect(path, *LABEL_KINDS, expected="labels (label or annotate output, records with human labels, "
                                            "a run folder or llm-jp-sae demo data)")
    out = LabelSet(source=str(source))
    if path.is_dir():
        label_files = [runlib.site_dir(path, site) / "labels.jsonl" for site in runlib.sites(path)]
        label_files = [f for f in label_files if f.is_file()]
        if label_files:
            for file in label_files:
                _load_jsonl(file, out)
        elif (data_dir := llmjp_data_dir(path)) is not None:
            _load_llmjp_demo(data_dir, out)
        else:
            raise UserError(f"{path}: neither a run directory with step-N/labels.jsonl (or layer-L/) "
                            "nor an llm-jp-sae demo directory (docs/data/STEP/N.json)")
    elif path.suffix.lower() == ".csv":
        _load_csv(path, out)
    elif path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        _load_jsonl(path, out)
    else:
        raise UserError(f"{path}: unsupported label file (expected .jsonl, .jsonl.gz, .csv or a directory)")
    if not out.labels:
        raise UserError(f"{path}: no granularity labels found")
    return out


# --- the comparison -----------------------------------------------------------------------

@dataclass
class Agreement:
    """Agreement of two label lists on the same features."""

    n: int
    accuracy: float | None
    kappa: float | None  # four-way Cohen's kappa
    kappa_3way: float | None  # token / concept / uninterpretable
    classes: list[str]
    confusion: list[list[int]]  # rows: first labeller (human), columns: second (model)
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support (model vs human)
    shares_human: dict[str, float]
    shares_model: dict[str, float]


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def agreement(human: list[str], model: list[str]) -> Agreement:
    """Kappa (4- and 3-way), confusion and per-class P/R/F1 with scikit-learn; human is the reference."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix, precision_recall_fscore_support

    classes = list(GRANULARITIES)
    n = len(human)
    if n == 0:
        return Agreement(0, None, None, None, classes, [[0] * 4 for _ in classes], {}, {}, {})
    import warnings

    with warnings.catch_warnings():  # kappa is undefined (nan) when both sides use one class only
        warnings.simplefilter("ignore")
        kappa = _nan_to_none(cohen_kappa_score(human, model, labels=classes))
        kappa3 = _nan_to_none(cohen_kappa_score([three_way(h) for h in human], [three_way(m) for m in model],
                                                labels=list(THREE_WAY)))
    precision, recall, f1, support = precision_recall_fscore_support(
        human, model, labels=classes, zero_division=0)
    return Agreement(
        n=n,
        accuracy=sum(h == m for h, m in zip(human, model)) / n,
        kappa=kappa,
        kappa_3way=kappa3,
        classes=classes,
        confusion=confusion_matrix(human, model, labels=classes).tolist(),
        per_class={c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                   for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        shares_human={c: human.count(c) / n for c in classes},
        shares_model={c: model.count(c) / n for c in classes},
    )


@dataclass
class ComparisonResult:
    overall: Agreement
    per_checkpoint: dict[int | None, Agreement]
    disagreements: list[dict[str, Any]]  # {checkpoint_step, feature, human, model, description}
    n_common: int
    only_human: int
    only_model: int
    human_source: str = ""
    model_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "human_source": self.human_source, "model_source": self.model_source,
            "n_common": self.n_common, "only_human": self.only_human, "only_model": self.only_model,
            "overall": asdict(self.overall),
            "per_checkpoint": [{"checkpoint_step": s, **asdict(a)} for s, a in self.per_checkpoint.items()],
            "disagreements": self.disagreements,
        }

    def to_markdown(self, max_disagreements: int | None = None) -> str:
        return _markdown(self, max_disagreements)


def compare_labels(human: dict[Key, str], model: dict[Key, str],
                   descriptions: dict[Key, str] | None = None) -> ComparisonResult:
    """Compare two label dicts on the features they share, overall and per checkpoint."""
    common = sorted(set(human) & set(model), key=Key.sort_key)
    descriptions = descriptions or {}
    steps = sorted({k.checkpoint_step for k in common}, key=lambda s: -1 if s is None else s)
    per_checkpoint = {}
    for step in steps:
        keys = [k for k in common if k.checkpoint_step == step]
        per_checkpoint[step] = agreement([human[k] for k in keys], [model[k] for k in keys])
    disagreements = [
        {"checkpoint_step": k.checkpoint_step, "feature": k.feature, "human": human[k], "model": model[k],
         "description": descriptions.get(k, "")}
        for k in common if human[k] != model[k]
    ]
    return ComparisonResult(
        overall=agreement([human[k] for k in common], [model[k] for k in common]),
        per_checkpoint=per_checkpoint, disagreements=disagreements, n_common=len(common),
        only_human=len(set(human) - set(model)), only_model=len(set(model) - set(human)),
    )


def align_layers(a: LabelSet, b: LabelSet) -> None:
    """Labels that name no layer (a CSV, an older file) join the other side's latents at the same
    step and feature, where that side has one layer per step."""
    for bare, full in ((a, b), (b, a)):
        if bare.labels and all(k.layer is None for k in bare.labels) and any(k.layer is not None for k in full.labels):
            layers = {(k.checkpoint_step, k.feature): k.layer for k in full.labels}
            if len({(k.checkpoint_step, k.layer) for k in full.labels}) > len({k.checkpoint_step for k in full.labels}):
                raise UserError(f"{bare.source} names no layer, but {full.source} has several layers at one step: "
                                "add a layer column (or field) to the labels")
            for table in (bare.labels, bare.descriptions):
                for k in list(table):
                    layer = layers.get((k.checkpoint_step, k.feature))
                    if layer is not None:
                        table[Key(k.checkpoint_step, layer, k.feature)] = table.pop(k)


def compare_files(human: str | Path, model: str | Path) -> ComparisonResult:
    h, m = load_labels(human), load_labels(model)
    align_layers(h, m)
    result = compare_labels(h.labels, m.labels, {**h.descriptions, **m.descriptions})
    result.human_source, result.model_source = h.source, m.source
    if result.n_common == 0:
        raise UserError(no_overlap_message(h.labels, m.labels, human, model))
    return result


def feature_ranges(features: list[int], limit: int = 6) -> str:
    """Sorted ids as short ranges: [0, 1, 2, 7, 9] -> "0–2, 7, 9"; past `limit` parts, "…"."""
    parts: list[str] = []
    ids = sorted(set(features))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if j == i else f"{ids[i]}–{ids[j]}")
        i = j + 1
    return ", ".join(parts[:limit]) + (", …" if len(parts) > limit else "")


def no_overlap_message(human: dict[Key, str], model: dict[Key, str], human_source: str | Path,
                       model_source: str | Path) -> str:
    """Why two label sets share no feature, and what to do: features per checkpoint on each side,
    and the `annotate --features N` that gives the model's seeded sample."""
    def by_step(labels: dict[Key, str]) -> dict[int | None, list[int]]:
        out: dict[int | None, list[int]] = {}
        for key in labels:
            out.setdefault(key.checkpoint_step, []).append(key.feature)
        return out

    def steps_text(steps) -> str:
        return ", ".join(str(s) for s in sorted(steps, key=lambda s: -1 if s is None else s))

    hs, ms = by_step(human), by_step(model)
    head = f"no (checkpoint_step, layer, feature) in common between {human_source} and {model_source}"
    shared = sorted(set(hs) & set(ms), key=lambda s: -1 if s is None else s)
    if not shared:
        return (f"{head}: the human labels are at step(s) {steps_text(hs)}, the model labels at step(s) "
                f"{steps_text(ms)}; label or annotate the same checkpoints")
    step = shared[-1]
    n = max(len(ms[s]) for s in shared)
    model_path = Path(model_source)
    records = model_path if model_path.is_dir() else runlib.records_file(model_path.parent)
    target = str(records) if records.exists() else "RECORDS"
    count = f"{len(ms[step])} feature{'s' if len(ms[step]) != 1 else ''}"
    return (f"{head}: the human labels cover features {feature_ranges(hs[step])} at step {step}; the model labels "
            f"cover {feature_ranges(ms[step])} ({count}). `autointerp label --features N` labels a seeded sample of "
            f"N live features per checkpoint: annotate the same ones with "
            f"`autointerp annotate {target} --features {n}`")


# --- output -------------------------------------------------------------------------------

def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _markdown(result: ComparisonResult, max_disagreements: int | None) -> str:
    o = result.overall
    lines = [
        "# Label comparison", "",
        f"- human: `{result.human_source}`", f"- model: `{result.model_source}`",
        f"- compared: {result.n_common} features; only in human: {result.only_human}; "
        f"only in model: {result.only_model}", "",
        "| checkpoint | n | accuracy | kappa (4-way) | kappa (3-way) |", "|---|---|---|---|---|",
    ]
    for step, a in result.per_checkpoint.items():
        lines.append(f"| {step} | {a.n} | {_fmt(a.accuracy)} | {_fmt(a.kappa)} | {_fmt(a.kappa_3way)} |")
    lines.append(f"| **all** | {o.n} | {_fmt(o.accuracy)} | {_fmt(o.kappa)} | {_fmt(o.kappa_3way)} |")
    lines += ["", "## Confusion matrix (rows: human, columns: model)", "",
              "| human \\ model | " + " | ".join(o.classes) + " |", "|---" * (len(o.classes) + 1) + "|"]
    for c, row in zip(o.classes, o.confusion):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## Per class (model against human)", "", "| class | precision | recall | F1 | support |",
              "|---|---|---|---|---|"]
    for c, m in o.per_class.items():
        lines.append(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    shown = result.disagreements[:max_disagreements] if max_disagreements else result.disagreements
    lines += ["", f"## Disagreements ({len(result.disagreements)})", "",
              "| checkpoint | feature | human | model | description |", "|---|---|---|---|---|"]
    for d in shown:
        # escaped: Markdown viewers render raw HTML, and descriptions come from an LLM
        desc = html.escape(str(d["description"])).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {d['checkpoint_step']} | {d['feature']} | {d['human']} | {d['model']} | {desc} |")
    if len(shown) < len(result.disagreements):
        lines.append(f"\n… {len(result.disagreements) - len(shown)} more in the JSON file.")
    return "\n".join(lines) + "\n"


def print_result(result: ComparisonResult, max_disagreements: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    console.print(f"compared [bold]{result.n_common}[/] features; only in human: {result.only_human}, "
                  f"only in model: {result.only_model}")
    table = Table(title="Agreement (human vs model)")
    for col in ("checkpoint", "n", "accuracy", "kappa 4-way", "kappa 3-way"):
        table.add_column(col, justify="right")
    for step, a in result.per_checkpoint.items():
        table.add_row(str(step), str(a.n), _fmt(a.accuracy), _fmt(a.kappa), _fmt(a.kappa_3way))
    o = result.overall
    table.add_row("all", str(o.n), _fmt(o.accuracy), _fmt(o.kappa), _fmt(o.kappa_3way), style="bold")
    console.print(table)

    confusion = Table(title="Confusion (rows: human, columns: model)")
    confusion.add_column("human \\ model")
    for c in o.classes:
        confusion.add_column(SHORT_NAMES[c], justify="right")
    for c, row in zip(o.classes, o.confusion):
        confusion.add_row(c, *(str(v) for v in row))
    console.print(confusion)

    per_class = Table(title="Per class (model against human)")
    for col in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="right" if col != "class" else "left")
    for c, m in o.per_class.items():
        per_class.add_row(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    console.print(per_class)

    if result.disagreements and max_disagreements > 0:
        dis = Table(title=f"Disagreements (first {min(max_disagreements, len(result.disagreements))} "
                          f"of {len(result.disagreements)})")
        for col in ("checkpoint", "feature", "human", "model", "description"):
            dis.add_column(col, overflow="fold")
        for d in result.disagreements[:max_disagreements]:
            # Text, not a markup string: a description like "[bold]" or "<b>" is shown as written
            dis.add_row(str(d["checkpoint_step"]), str(d["feature"]), d["human"], d["model"], Text(d["description"]))
        console.print(dis)


def write_result(result: ComparisonResult, prefix: str | Path) -> tuple[Path, Path]:
    """Write PREFIX.json and PREFIX.md."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{prefix}.json"), Path(f"{prefix}.md")
    json_path.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    md_path.write_text(result.to_markdown())
    return json_path, md_path


def cli(
    human: Path = typer.Argument(..., help="Reference labels: label/annotate JSONL, records JSONL with human "
                                          "fields (the dev file), a run dir, an llm-jp-sae docs/data dir, or a CSV."),
    model: Path = typer.Argument(..., metavar="LABELS", help="Labels to evaluate, in any of the same formats (e.g. runs/demo)."),
    out: Path | None = typer.Option(None, "--out", help="Write PREFIX.json and PREFIX.md."),
    show: int = typer.Option(20, "--show", min=0, help="How many disagreeing features to print (all go to --out)."),
) -> None:
    """Compare human and model granularity labels: Cohen's kappa, confusion, per-class P/R/F1."""
    result = compare_files(human, model)
    print_result(result, max_disagreements=show)
    if out is not None:
        json_path, md_path = write_result(result, out)
        print(f"wrote {json_path} and {md_path}")
