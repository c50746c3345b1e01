"""Static HTML reports: RUN/report/index.html across checkpoints and RUN/report/step-N.html per checkpoint.

    autointerp report RUN_DIR [--human FILE]

The index plots how the features evolve over training (granularity shares, the paper's main
figure; language trend; cross-lingual share; simulator scores; SAE metrics; model vs human
labels and kappa). Each checkpoint page lists its features with their description, label,
scores, language profile and top contexts shaded by activation, with class/language filters.
Pages are self-contained (plots are embedded PNGs, CSS and JS inline) and every string from the
data is HTML-escaped by jinja2's autoescape. A stage that has not run is named, not fatal.
"""

from __future__ import annotations

import base64
import heapq
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import typer

from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.language import profile as language_profile
from autointerp.language import trend as language_trend
from autointerp.schema import (
    GRANULARITIES, LANGUAGE_TRENDS, Explanation, FeatureRecord, Label, Scores, iter_jsonl, stream_lean_records,
)

Key = tuple[int | None, int]
SCORE_NAMES = ("simulation", "detection", "fuzzing")
# SAE metrics plotted on the index, with the metrics.json key spellings we accept.
SAE_METRICS = {
    "FVU": ("fvu", "fraction_variance_unexplained"),
    "L0": ("l0", "mean_l0"),
    "dead fraction": ("dead_fraction", "dead_frac", "frac_dead", "dead_latents_fraction"),
    "delta CE": ("delta_ce", "ce_delta", "ce_loss_delta", "delta_ce_loss", "ce_increase"),
}
COLORS = {"token": "#4e79a7", "concept-synonym": "#59a14f", "concept-semantic": "#edc948",
          "uninterpretable": "#bab0ac", "en": "#4e79a7", "ja": "#e15759", "mix": "#b07aa1"}


# --- reading a run directory -----------------------------------------------------------------

# A checkpoint page lists at most this many features by default: a whole SAE (32,768 latents)
# on one page would be hundreds of MB of HTML; the page says how many it leaves out.
DEFAULT_MAX_FEATURES = 1000


@dataclass
class StepData:
    step: int
    records: dict[Key, FeatureRecord] = field(default_factory=dict)  # those kept (see read_step)
    n_records: int = 0  # all records in the file, kept or not
    record_keys: set[Key] = field(default_factory=set)
    record_trends: Counter = field(default_factory=Counter)  # the paper's language trend of every record
    context_counts: dict[Key, int] = field(default_factory=dict)  # contexts of kept records before trimming
    labels: dict[Key, Label] = field(default_factory=dict)
    explanations: dict[Key, Explanation] = field(default_factory=dict)
    scores: dict[Key, Scores] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _read_keyed(path: Path, parse: Callable[[dict], Any], warnings: list[str]) -> dict[Key, Any]:
    # A torn last line (a crash mid-append) or a bad line is reported on the page, not fatal.
    return {item.key: item for item in iter_jsonl(path, parse, on_error="skip", warn=warnings.append)}


def read_step(run: Path, step: int, max_records: int | None = None, max_contexts: int | None = None) -> StepData:
    """A checkpoint's stage outputs. Records are streamed: every one is counted and its language
    trend tallied, but only `max_records` are kept (None: all): the labelled ones with the
    lowest feature ids first, then unlabelled ones by feature id; kept records keep only their
    first `max_contexts` contexts and no negatives (None: all). So memory does not grow with
    the number of latents."""
    folder = runlib.step_dir(run, step)
    data = StepData(step=step)
    stages = [("labels.jsonl", "labels", Label.from_dict, "labels (autointerp label)"),
              ("explanations.jsonl", "explanations", Explanation.from_dict, None),
              ("scores.jsonl", "scores", Scores.from_dict, None)]
    for filename, attr, parse, missing_name in stages:
        path = folder / filename
        if path.exists():
            setattr(data, attr, _read_keyed(path, parse, data.warnings))
        elif missing_name:
            data.missing.append(missing_name)
    records_path = runlib.records_file(folder)
    if records_path.exists():
        _stream_records(records_path, data, max_records, max_contexts)
    else:
        data.missing.insert(0, "records (autointerp collect)")
    metrics_path = folder / "sae" / "metrics.json"
    if metrics_path.exists():
        try:
            data.metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as exc:
            data.warnings.append(f"{metrics_path}: not JSON ({exc})")
    else:
        data.missing.append("SAE metrics (sae/metrics.json)")
    return data


def _stream_records(path: Path, data: StepData, max_records: int | None, max_contexts: int | None) -> None:
    labelled = sorted(data.labels, key=lambda k: k[1])
    wanted = set(labelled if max_records is None else labelled[:max_records])
    room = None if max_records is None else max_records - len(wanted)
    unlabelled: list[tuple[int, int, FeatureRecord]] = []  # a max-heap by feature id (negated), size <= room
    # a page shows contexts, density and max activation: the lean reader skips negatives and extras
    for i, record in enumerate(stream_lean_records(path, on_error="skip", warn=data.warnings.append)):
        data.n_records += 1
        data.record_keys.add(record.key)
        data.record_trends[language_trend(record)] += 1
        if max_contexts is not None:
            data.context_counts[record.key] = len(record.contexts)
            record.contexts, record.negatives = record.contexts[:max_contexts], []
        if record.key in data.labels:
            if record.key in wanted:
                data.records[record.key] = record
        elif room is None:
            data.records[record.key] = record
        elif room > 0:
            heapq.heappush(unlabelled, (-record.feature, -i, record))
            if len(unlabelled) > room:
                heapq.heappop(unlabelled)
    data.records.update((r.key, r) for _, _, r in unlabelled)


def sae_metric(metrics: dict[str, Any], name: str) -> float | None:
    """One of SAE_METRICS from metrics.json, at the top level or one level down (e.g. {"eval": {...}})."""
    for scope in [metrics, *(v for v in metrics.values() if isinstance(v, dict))]:
        for key in SAE_METRICS[name]:
            value = scope.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


# --- per-feature view models -----------------------------------------------------------------

def _display_token(token: str) -> str:
    return "↵" if token in ("\n", "<0x0A>") else token.replace("\n", "↵")


def context_window(context, window: int) -> dict[str, Any]:
    """Tokens within `window` of the max token, as (text, level, activation) for shading."""
    i = context.max_index
    start, end = max(0, i - window), min(len(context.tokens), i + window + 1)
    acts = context.activations
    tokens = [{"text": _display_token(context.tokens[j]), "level": max(0, min(10, context.levels[j])),
               "act": None if acts is None else round(acts[j], 3), "max": j == i}
              for j in range(start, end)]
    return {"tokens": tokens, "cut_left": start > 0, "cut_right": end < len(context.tokens)}


def feature_view(key: Key, data: StepData, human: dict[Key, str], n_contexts: int, window: int) -> dict[str, Any]:
    label, record = data.labels.get(key), data.records.get(key)
    explanation, scores = data.explanations.get(key), data.scores.get(key)
    if label is not None:
        profile = label.language_profile or (language_profile(record) if record else {})
        language = label.language or profile.get("trend")
        score_values = dict(label.scores or {})
        description, granularity = label.description, label.granularity
        cross_lingual, confidence, error = label.cross_lingual, label.confidence, label.error
    else:
        profile = language_profile(record) if record else {}
        language = profile.get("trend")
        score_values = {n: getattr(scores, n) for n in SCORE_NAMES} if scores else {}
        description = explanation.description if explanation else ""
        granularity = None
        cross_lingual = bool(explanation.cross_lingual) if explanation else bool(profile.get("cross_lingual"))
        confidence, error = (explanation.confidence if explanation else None), None
    return {
        "feature": key[1], "description": description or "", "granularity": granularity or "unlabelled",
        "language": language or "unknown", "cross_lingual": cross_lingual, "confidence": confidence,
        "error": error, "human": human.get(key),
        "scores": {n: score_values.get(n) for n in SCORE_NAMES if score_values.get(n) is not None},
        "profile": _profile_summary(profile),
        "density": record.density if record else None,
        "max_activation": record.max_activation if record else None,
        "contexts": [context_window(c, window) for c in (record.contexts[:n_contexts] if record else [])],
        "n_contexts": data.context_counts.get(key, len(record.contexts)) if record else 0,
    }


def _profile_summary(profile: dict[str, Any]) -> list[tuple[str, str]]:
    """Flat (name, value) pairs of a language profile's scalar fields, for display."""
    out = []
    for name, value in profile.items():
        if isinstance(value, dict):
            items = [(k, v) for k, v in value.items() if isinstance(v, (int, float, str))]
            text = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in items[:6])
        elif isinstance(value, float):
            text = f"{value:.3f}"
        elif isinstance(value, (int, str, bool)):
            text = str(value)
        else:
            continue
        out.append((str(name), text))
    return out


# --- per-checkpoint summaries and plots ---------------------------------------------------------

def step_summary(data: StepData, human: dict[Key, str]) -> dict[str, Any]:
    labels = list(data.labels.values())
    granularity = Counter(l.granularity or "unlabelled" for l in labels)
    if labels:
        language = Counter(l.language or (l.language_profile or {}).get("trend") or "unknown" for l in labels)
        cross = sum(l.cross_lingual for l in labels) / len(labels)
    elif data.n_records:
        language = Counter(data.record_trends)
        cross = None
    else:
        language, cross = Counter(), None
    scores = {n: [v for v in ((l.scores or {}).get(n) for l in labels) if isinstance(v, (int, float))]
              for n in SCORE_NAMES}
    if not labels and data.scores:
        scores = {n: [getattr(s, n) for s in data.scores.values() if getattr(s, n) is not None]
                  for n in SCORE_NAMES}
    step_human = {k: v for k, v in human.items() if k[0] == data.step}
    agreement = None
    model = {k: l.granularity for k, l in data.labels.items() if l.granularity}
    if step_human and model and set(step_human) & set(model):
        from autointerp.compare import compare_labels

        agreement = compare_labels(step_human, model).overall
    return {
        "step": data.step, "n_records": data.n_records, "n_labels": len(labels),
        "granularity": dict(granularity), "language": dict(language), "cross_lingual": cross,
        "scores": scores, "metrics": {name: sae_metric(data.metrics, name) for name in SAE_METRICS},
        "human_shares": _shares(Counter(step_human.values())), "agreement": agreement,
        "missing": data.missing, "warnings": data.warnings,
    }


def _shares(counts: Counter) -> dict[str, float]:
    n = sum(counts.values())
    return {k: v / n for k, v in counts.items()} if n else {}


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _stacked_bars(ax, steps: list[str], shares: list[dict[str, float]], classes: list[str], offset=0.0,
                  width=0.8, hatch=None, legend=True) -> None:
    import numpy as np

    x = np.arange(len(steps)) + offset
    bottom = np.zeros(len(steps))
    for c in classes:
        values = np.array([s.get(c, 0.0) for s in shares])
        ax.bar(x, values, width, bottom=bottom, color=COLORS.get(c, "#999"), hatch=hatch,
               label=c if legend else None, edgecolor="white" if hatch is None else "#444", linewidth=0.5)
        bottom += values
    ax.set_xticks(np.arange(len(steps)), steps)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of features")
    ax.set_xlabel("training step")


def make_plots(summaries: list[dict[str, Any]], has_human: bool) -> list[dict[str, str]]:
    """The index's figures as {"title", "png" (base64), "alt"}; a figure with no data is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    steps = [str(s["step"]) for s in summaries]
    labelled = [s for s in summaries if s["n_labels"]]

    if labelled:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        classes = list(GRANULARITIES) + (["unlabelled"] if any("unlabelled" in s["granularity"] for s in labelled) else [])
        _stacked_bars(ax, [str(s["step"]) for s in labelled], [_shares(Counter(s["granularity"])) for s in labelled], classes)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
        ax.set_title("Granularity of features per checkpoint")
        plots.append({"title": "Granularity shares per checkpoint", "png": _figure_png(fig),
                      "alt": "stacked bars: granularity shares per checkpoint"})

    with_language = [s for s in summaries if s["language"]]
    if with_language:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        _stacked_bars(ax, [str(s["step"]) for s in with_language],
                      [_shares(Counter(s["language"])) for s in with_language], list(LANGUAGE_TRENDS) + ["unknown"])
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
        ax.set_title("Language trend of features per checkpoint")
        plots.append({"title": "Language trend shares per checkpoint", "png": _figure_png(fig),
                      "alt": "stacked bars: en/ja/mix shares per checkpoint"})

    with_cross = [s for s in summaries if s["cross_lingual"] is not None]
    if with_cross:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([str(s["step"]) for s in with_cross], [s["cross_lingual"] for s in with_cross], color="#76b7b2")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of features")
        ax.set_xlabel("training step")
        ax.set_title("Cross-lingual features per checkpoint")
        plots.append({"title": "Cross-lingual share", "png": _figure_png(fig),
                      "alt": "bars: share of cross-lingual features per checkpoint"})

    present = [n for n in SCORE_NAMES if any(s["scores"][n] for s in summaries)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
        for ax, name in zip(axes[0], present):
            data = [s["scores"][name] for s in summaries]
            positions = [i for i, d in enumerate(data) if d]
            ax.boxplot([data[i] for i in positions], positions=positions, widths=0.6)
            ax.set_xticks(range(len(steps)), steps, rotation=45)
            ax.set_title(f"{name} score")
            ax.set_xlabel("training step")
        fig.tight_layout()
        plots.append({"title": "Score distributions", "png": _figure_png(fig),
                      "alt": "box plots: simulator scores per checkpoint"})

    metric_names = [m for m in SAE_METRICS if any(s["metrics"][m] is not None for s in summaries)]
    if metric_names:
        fig, axes = plt.subplots(1, len(metric_names), figsize=(3.2 * len(metric_names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], metric_names):
            points = [(i, s["metrics"][name]) for i, s in enumerate(summaries) if s["metrics"][name] is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#f28e2b")
            ax.set_xticks(range(len(steps)), steps, rotation=45)
            ax.set_title(name)
            ax.set_xlabel("training step")
        fig.tight_layout()
        plots.append({"title": "SAE metrics per checkpoint", "png": _figure_png(fig),
                      "alt": "line plots: FVU, L0, dead fraction and delta CE per checkpoint"})

    compared = [s for s in summaries if s["agreement"] is not None]
    if has_human and compared:
        fig, (ax, ax_kappa) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2, 1]})
        names = [str(s["step"]) for s in compared]
        _stacked_bars(ax, names, [s["agreement"].shares_human for s in compared], list(GRANULARITIES),
                      offset=-0.2, width=0.38)
        _stacked_bars(ax, names, [s["agreement"].shares_model for s in compared], list(GRANULARITIES),
                      offset=0.2, width=0.38, hatch="//", legend=False)
        ax.set_title("Human (left, plain) vs model (right, hatched)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
        ax_kappa.tick_params(axis="x", labelrotation=45)
        kappas = [s["agreement"].kappa for s in compared]
        kappas3 = [s["agreement"].kappa_3way for s in compared]
        ax_kappa.plot(names, [k if k is not None else float("nan") for k in kappas], marker="o", label="4-way")
        ax_kappa.plot(names, [k if k is not None else float("nan") for k in kappas3], marker="s", label="3-way")
        ax_kappa.axhline(0, color="#999", linewidth=0.8)
        ax_kappa.set_ylim(-0.5, 1)
        ax_kappa.set_title("Cohen's kappa (human vs model)")
        ax_kappa.set_xlabel("training step")
        ax_kappa.legend(fontsize=8)
        fig.tight_layout()
        plots.append({"title": "Model vs human labels", "png": _figure_png(fig),
                      "alt": "stacked bars of human and model granularity shares, and kappa per checkpoint"})
    return plots


# --- rendering -----------------------------------------------------------------------------

def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("autointerp", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = lambda x, d=3: "–" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))
    env.filters["num"] = lambda x: "–" if x is None else f"{x:.4g}"
    return env


def _manifest_rows(manifest: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, info in (manifest.get("stages") or {}).items():
        info = info if isinstance(info, dict) else {}
        seconds = next((info[k] for k in ("seconds", "elapsed_s", "wall_s", "duration_s", "time_s")
                        if isinstance(info.get(k), (int, float))), None)
        rows.append({"stage": str(name), "finished_at": str(info.get("finished_at", "")),
                     "seconds": None if seconds is None else f"{seconds:.1f}"})
    return rows


def build_report(run_dir: str | Path, human: str | Path | None = None, out_dir: str | Path | None = None,
                 contexts_per_feature: int = 5, window: int = 12, max_features: int | None = None) -> Path:
    """Render RUN/report/index.html and one step-N.html per checkpoint; return the index path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    steps = runlib.checkpoint_steps(run)
    out = Path(out_dir) if out_dir else run / "report"
    human_labels: dict[Key, str] = {}
    comparison = None
    if human is not None:
        from autointerp.compare import compare_labels, load_labels

        human_set = load_labels(human)
        human_labels = human_set.labels
    out.mkdir(parents=True, exist_ok=True)
    env = _environment()
    step_template = env.get_template("step.html")

    summaries, all_model = [], {}
    lineage_view = _lineage_view(run, steps)
    for i, step in enumerate(steps):
        data = read_step(run, step, max_features or DEFAULT_MAX_FEATURES, contexts_per_feature)
        summary = step_summary(data, human_labels)
        summaries.append(summary)
        all_model.update({k: l.granularity for k, l in data.labels.items() if l.granularity})
        # Labelled features first; unlabelled ones (records only) are shown by default only when
        # a checkpoint has no labels yet (a run labels a sample of its latents, e.g. the demo's 8 of 2048).
        labelled = sorted(data.labels, key=lambda k: k[1])
        unlabelled = sorted(set(data.records) - set(data.labels), key=lambda k: k[1])
        keys = labelled + unlabelled
        shown = keys[:max_features] if max_features else (labelled or unlabelled)[:DEFAULT_MAX_FEATURES]
        features = [feature_view(k, data, human_labels, contexts_per_feature, window) for k in shown]
        for f in features:  # parent at the previous checkpoint and children at the next (autointerp lineage)
            f["lineage"] = lineage_view.card(step, f["feature"]) if lineage_view else None
        n_features = len(set(data.labels) | data.record_keys)
        html = step_template.render(
            run_name=run.resolve().name, step=step, summary=summary, features=features,
            n_hidden=n_features - len(shown), classes=list(GRANULARITIES) + ["unlabelled"],
            languages=sorted({f["language"] for f in features}),
            prev_step=steps[i - 1] if i > 0 else None, next_step=steps[i + 1] if i + 1 < len(steps) else None,
            metrics=data.metrics, sae_metric_names=list(SAE_METRICS), has_human=bool(human_labels),
        )
        (out / f"step-{step}.html").write_text(html, encoding="utf-8")

    if human_labels and all_model and set(human_labels) & set(all_model):
        comparison = compare_labels(human_labels, all_model)
        comparison.human_source, comparison.model_source = str(human), str(run)
        (out / "compare.json").write_text(json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False))
    manifest = runlib.read_manifest(run)
    run_missing = [] if steps else ["checkpoints: no step-N/ folders (run `autointerp sae` and `autointerp collect`)"]
    if not manifest:
        run_missing.append("manifest.json")
    index = env.get_template("index.html").render(
        run_name=run.resolve().name, run_path=str(run.resolve()), summaries=summaries,
        plots=make_plots(summaries, bool(human_labels)), stages=_manifest_rows(manifest),
        model=_manifest_model(manifest), run_missing=run_missing, comparison=comparison,
        classes=list(GRANULARITIES), languages=list(LANGUAGE_TRENDS), sae_metric_names=list(SAE_METRICS),
        has_human=bool(human_labels), human_source=str(human) if human else None,
        lineage=lineage_view,
    )
    index_path = out / "index.html"
    index_path.write_text(index, encoding="utf-8")
    return index_path


def _lineage_view(run: Path, steps: list[int]):
    """The lineage section and card links, or None when `autointerp lineage` has not run."""
    from autointerp import lineage

    return lineage.report_view(run, steps)


def _manifest_model(manifest: dict[str, Any]) -> str | None:
    for stage in (manifest.get("stages") or {}).values():
        if isinstance(stage, dict) and isinstance(stage.get("model"), str):
            return stage["model"]
    return manifest.get("model") if isinstance(manifest.get("model"), str) else None


def cli(
    run_dir: Path = typer.Argument(..., help="Run directory (e.g. runs/demo)."),
    human: Path | None = typer.Option(None, "--human", help="Human labels to compare with (any format "
                                      "`autointerp compare` reads, e.g. the dev file or annotate output)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default RUN_DIR/report)."),
    contexts: int = typer.Option(5, "--contexts", min=1, help="Top contexts shown per feature."),
    window: int = typer.Option(12, "--window", min=1, help="Tokens shown either side of a context's max token."),
    max_features: int | None = typer.Option(None, "--max-features", min=1,
                                            help="At most this many features per checkpoint page, labelled first "
                                                 "(default: the labelled ones, or all when none is labelled, "
                                                 f"up to {DEFAULT_MAX_FEATURES})."),
) -> None:
    """Render the HTML report: RUN_DIR/report/index.html and one page per checkpoint."""
    from autointerp.files import Kind, expect

    expect(run_dir, Kind.RUN)
    index = build_report(run_dir, human, out, contexts, window, max_features)
    pages = sorted(index.parent.glob("step-*.html"))
    size = sum(p.stat().st_size for p in [index, *pages]) / 1e6
    print(f"wrote {index} and {len(pages)} checkpoint pages ({size:.1f} MB)")
