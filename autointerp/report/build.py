"""Static HTML reports: RUN/report/index.html across sites and RUN/report/SITE.html per site
(SITE: step-N for a checkpoint, layer-L for a layer of one model; run.Site).

    autointerp report RUN_DIR [--human FILE]

Every page opens with the run's shuffled-description control (manifest stages.label.control,
else stages.score.control): per method the gap matched - shuffled with its 95% interval and a
verdict in words; scores the control does not vouch for are greyed and labelled "noise". The
index plots how the features evolve over training from ALL labelled latents of each checkpoint
(granularity shares, the paper's main figure, with Wilson 95% intervals and the LLM-described
sample beside them; language trend; bilingual firing vs cross-lingual; the sample's scores; SAE
metrics; model vs human labels and kappa). Each checkpoint page shows its share table and lists
its features (the LLM-described first) with the evidence summary, description, scores with their
intervals, language profile and top contexts shaded by activation, with filters. Labels and
records are streamed, so memory does not grow with the number of latents. Pages are
self-contained (plots are embedded PNGs, CSS and JS inline) and every string from the data is
HTML-escaped by jinja2's autoescape. A stage that has not run is named, not fatal.
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
from autointerp.labels.language import profile as language_profile
from autointerp.labels.language import trend as language_trend
from autointerp.report.sae import SynonymTable, density_png, is_dead, metric_columns, metric_rows
from autointerp.labels.shares import ShareCounter, ShareTable, sample_agreement
from autointerp.jsonl import iter_jsonl
from autointerp.records.lean import stream_lean_records
from autointerp.schema import Key, GRANULARITIES, LANGUAGE_TRENDS, Explanation, FeatureRecord, Label, Scores

SCORE_NAMES = ("simulation", "detection", "fuzzing")
# SAE metrics plotted on the index, with the metrics.json key spellings we accept.
SAE_METRICS = {
    "FVU": ("fvu", "fraction_variance_unexplained"),
    "L0": ("l0", "mean_l0"),
    "dead fraction": ("dead_fraction", "dead_frac", "frac_dead", "dead_latents_fraction"),
    "delta CE": ("delta_ce", "ce_delta", "ce_loss_delta", "delta_ce_loss", "ce_increase"),
}
GRANULARITY_ORDER = {g: i for i, g in enumerate(GRANULARITIES)}  # the order of a page's cards
COLORS = {"token": "#4e79a7", "concept-synonym": "#59a14f", "concept-semantic": "#edc948",
          "uninterpretable": "#bab0ac", "en": "#4e79a7", "ja": "#e15759", "mix": "#b07aa1"}


# --- reading a run directory -----------------------------------------------------------------

# A checkpoint page lists at most this many features by default: a whole SAE (32,768 latents)
# on one page would be hundreds of MB of HTML; the page says how many it leaves out.
DEFAULT_MAX_FEATURES = 1000


def described(label: Label) -> bool:
    """In the LLM-described sample: `sampled`, or a description (files from before `sampled`
    held labels for the LLM sample only)."""
    return label.sampled or bool((label.description or "").strip())


def _score_value(scores: dict[str, Any], name: str) -> float | None:
    value = (scores or {}).get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class StepCounts:
    """What a checkpoint's summary counts over every label line, streamed: only counts and the
    LLM sample's score values are kept."""

    def __init__(self):
        self.granularity = ShareCounter("granularity")
        self.granularity_sample = ShareCounter("granularity")
        self.language = ShareCounter("language")
        self.bilingual = ShareCounter("bilingual_firing")
        self.cross = ShareCounter("cross_lingual")
        self.scores: dict[str, list[float]] = {n: [] for n in SCORE_NAMES}
        self.scores_noise = 0  # labels whose scores the run's control called noise
        self.undescribed = 0  # sampled latents the LLM left without a description (the label's error says why)
        self.dead = 0  # label lines of latents with no contexts: counted apart, not a class

    def add(self, label: Label) -> None:
        if is_dead(label):
            self.dead += 1
            return
        language = {"language": label.language or label.language_profile.get("trend") or "unknown"}
        self.granularity.add(label)
        self.language.add(language)
        self.bilingual.add(label)
        self.cross.add(label)
        if described(label):
            self.granularity_sample.add(label)
            for name in SCORE_NAMES:
                value = _score_value(label.scores, name)
                if value is not None:
                    self.scores[name].append(value)
            self.scores_noise += label.scores_noise
            self.undescribed += not (label.description or "").strip()


@dataclass
class StepData:
    site: runlib.Site
    records: dict[Key, FeatureRecord] = field(default_factory=dict)  # those kept (see read_step)
    n_records: int = 0  # all records in the file, kept or not
    n_live: int = 0  # records with contexts: the latents a label file should cover
    record_keys: set[Key] = field(default_factory=set)
    record_trends: Counter = field(default_factory=Counter)  # the paper's language trend of every record
    context_counts: dict[Key, int] = field(default_factory=dict)  # contexts of kept records before trimming
    labels: dict[Key, Label] = field(default_factory=dict)  # the labels kept for the page, in its order (read_step)
    n_labels: int = 0  # every line of labels.jsonl
    label_keys: set[Key] = field(default_factory=set)
    counts: StepCounts | None = None  # None: no labels.jsonl
    model_granularity: dict[Key, str] = field(default_factory=dict)  # for the human comparison only
    explanations: dict[Key, Explanation] = field(default_factory=dict)
    scores: dict[Key, Scores] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layer: int | None = None  # the layer the site's SAE reads: rows that name none are at this one
    synonyms: SynonymTable = field(default_factory=SynonymTable)
    densities: list[float] = field(default_factory=list)  # every live record's firing density


def _at_layer(item: Any, layer: int | None) -> Any:
    """A site's row that names no layer (an older file) is at the site's layer."""
    if item.layer is None:
        item.layer = layer
    return item


def _read_keyed(path: Path, parse: Callable[[dict], Any], warnings: list[str],
                keep: Callable[[Key], bool] = lambda key: True, layer: int | None = None) -> dict[Key, Any]:
    # A torn last line (a crash mid-append) or a bad line is reported on the page, not fatal.
    items = (_at_layer(item, layer) for item in iter_jsonl(path, parse, on_error="skip", warn=warnings.append))
    return {item.key: item for item in items if keep(item.key)}


def read_step(run: Path, site: runlib.Site, max_records: int | None = None, max_contexts: int | None = None,
              human_keys: set[Key] | frozenset = frozenset()) -> StepData:
    """A site's stage outputs, streamed so memory does not grow with the number of latents.

    Every label line is counted (StepCounts: shares over all latents, the LLM sample's beside
    them), but only `max_records` labels are kept for the page (None: all): the LLM-described
    ones first, then by feature id. Every record is counted and its language trend tallied, but
    only the kept labels' records are kept, then (room left) unlabelled ones by feature id; kept
    records keep their first `max_contexts` contexts and no negatives (None: all). The model's
    granularity is kept only for `human_keys` (the human comparison)."""
    folder = runlib.site_dir(run, site)
    data = StepData(site=site, layer=_site_layer(run, site))
    labels_path = folder / "labels.jsonl"
    if labels_path.exists():
        _stream_labels(labels_path, data, max_records, human_keys)
    else:
        data.missing.append("labels (autointerp label)")
    # explanations and scores: the kept labels' (files of the LLM sample; all when there are no labels)
    keep = (lambda key: True) if data.counts is None else (lambda key: key in data.labels)
    for filename, attr, parse in [("explanations.jsonl", "explanations", Explanation.from_dict),
                                  ("scores.jsonl", "scores", Scores.from_dict)]:
        path = folder / filename
        if path.exists():
            setattr(data, attr, _read_keyed(path, parse, data.warnings, keep, data.layer))
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


def _stream_labels(path: Path, data: StepData, max_records: int | None, human_keys) -> None:
    counts = StepCounts()
    kept: list[tuple[tuple[int, int], int, Label]] = []  # a max-heap on (not described, feature), negated
    repeated = 0
    for i, label in enumerate(iter_jsonl(path, Label.from_dict, on_error="skip", warn=data.warnings.append)):
        _at_layer(label, data.layer)
        if label.key in data.label_keys:  # counted and shown once: the first line
            repeated += 1
            continue
        data.label_keys.add(label.key)
        counts.add(label)
        data.synonyms.add(label, data.site.name, data.site.title)
        if label.key in human_keys and label.granularity:
            data.model_granularity[label.key] = label.granularity
        order = (-int(not described(label)), -int(is_dead(label)), -GRANULARITY_ORDER.get(label.granularity, 9),
                 -label.feature)  # described first, then by class, dead latents last
        heapq.heappush(kept, (order, -i, label))
        if max_records is not None and len(kept) > max_records:
            heapq.heappop(kept)
    if repeated:
        data.warnings.append(f"{path}: {repeated} repeated lines for latents already read (the first line counts)")
    data.n_labels, data.counts = len(data.label_keys), counts
    data.labels = {label.key: label for _, _, label in sorted(kept, reverse=True)}


def _stream_records(path: Path, data: StepData, max_records: int | None, max_contexts: int | None) -> None:
    wanted = set(data.labels)  # the labels kept for the page
    room = None if max_records is None else max_records - len(wanted)
    unlabelled: list[tuple[int, int, FeatureRecord]] = []  # a max-heap by feature id (negated), size <= room
    # a page shows contexts, density and max activation: the lean reader skips negatives and extras
    for i, record in enumerate(stream_lean_records(path, on_error="skip", warn=data.warnings.append)):
        data.n_records += 1
        data.n_live += bool(record.contexts)
        data.record_keys.add(record.key)
        data.record_trends[language_trend(record)] += 1
        if record.density is not None or not record.contexts:
            data.densities.append(record.density if record.contexts else 0.0)  # a dead latent: never fires
        if max_contexts is not None:
            data.context_counts[record.key] = len(record.contexts)
            record.contexts, record.negatives = record.contexts[:max_contexts], []
        if record.key in data.label_keys:
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
    return "↵" if token in ("\n", "<0x0A>") else token.replace("\n", "↵").replace("▁", " ")


def context_window(context, window: int) -> dict[str, Any]:
    """Tokens within `window` of the max token, as (text, level, activation) for shading."""
    i = context.max_index
    start, end = max(0, i - window), min(len(context.tokens), i + window + 1)
    acts = context.activations
    tokens = [{"text": _display_token(context.tokens[j]), "level": max(0, min(10, context.levels[j])),
               "act": None if acts is None else round(acts[j], 3), "max": j == i}
              for j in range(start, end)]
    return {"tokens": tokens, "cut_left": start > 0, "cut_right": end < len(context.tokens)}


def _score_views(scores: dict[str, Any], fallback: Scores | None, grey: dict[str, str]) -> list[dict[str, Any]]:
    """Each method's score with what it rests on: 95% interval, n examples, AUC. The label's
    values first, then scores.jsonl's (`fallback`) for what the label lacks; `grey` maps the
    methods the control did not vouch for to why ("noise", "no control")."""
    scores = scores or {}
    ci95, auc, n = dict(scores.get("ci95") or {}), dict(scores.get("auc") or {}), dict(scores.get("n") or {})
    if fallback is not None:
        ci95, auc = (fallback.ci95 or {}) | ci95, (fallback.auc or {}) | auc
        examples = (fallback.simulator or {}).get("examples")
        total = sum(v for v in examples.values() if isinstance(v, int)) if isinstance(examples, dict) else 0
        n = ({m: total for m in SCORE_NAMES} if total else {}) | n
    out = []
    for name in SCORE_NAMES:
        value = _score_value(scores, name)
        if value is None and fallback is not None:
            value = getattr(fallback, name)
        if value is None:
            continue
        interval = ci95.get(name)
        interval = list(interval) if isinstance(interval, (list, tuple)) and len(interval) == 2 else None
        out.append({"name": name, "value": value, "ci95": interval, "n": n.get(name), "auc": auc.get(name),
                    "grey": grey.get(name)})
    return out


def feature_view(key: Key, data: StepData, human: dict[Key, str], n_contexts: int, window: int,
                 grey: dict[str, str] | None = None) -> dict[str, Any]:
    grey = dict(grey or {})
    label, record = data.labels.get(key), data.records.get(key)
    explanation, scores = data.explanations.get(key), data.scores.get(key)
    if label is not None:
        profile = label.language_profile or (language_profile(record) if record else {})
        language = label.language or profile.get("trend")
        if label.scores_noise:
            grey = {m: "noise" for m in SCORE_NAMES}
        score_views = _score_views(label.scores, scores, grey)
        description, granularity = label.description, label.granularity
        bilingual, cross_lingual = label.bilingual_firing, label.cross_lingual
        confidence, error, sampled = label.confidence, label.error, described(label)
        evidence_summary, explainer = label.evidence_summary, label.explainer or {}
    else:
        profile = language_profile(record) if record else {}
        language = profile.get("trend")
        score_views = _score_views({}, scores, grey)
        description = explanation.description if explanation else ""
        granularity, evidence_summary = None, ""
        bilingual, cross_lingual = bool(profile.get("cross_lingual")), False
        confidence, error = (explanation.confidence if explanation else None), None
        sampled, explainer = bool(description), (explanation.explainer if explanation else {}) or {}
    return {
        "feature": key.feature, "description": description or "", "granularity": granularity or "unlabelled",
        "language": language or "unknown", "bilingual_firing": bilingual, "cross_lingual": cross_lingual,
        "sampled": sampled, "labelled": label is not None, "evidence_summary": evidence_summary,
        "explainer_model": str(explainer.get("model") or "") if isinstance(explainer, dict) else "",
        "confidence": confidence, "error": error, "human": human.get(key),
        "scores": score_views,
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
        name = "bilingual_firing" if name == "cross_lingual" else name  # the profile's flag is not the paper's sense
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
    """A checkpoint's shares over ALL its label lines (Wilson 95% intervals), the LLM-described
    sample's beside them and how the two agree; without labels, the records' language trends."""
    counts = data.counts
    if counts is not None:
        granularity, sample = counts.granularity.table(), counts.granularity_sample.table()
        language = counts.language.table()
        bilingual = counts.bilingual.table().get(True) if counts.bilingual.n else None
        cross = counts.cross.table().get(True) if counts.cross.n else None
        scores = {n: list(v) for n, v in counts.scores.items()}
        agreement_sample = sample_agreement(granularity, sample, GRANULARITIES) if granularity.n else None
    else:
        granularity, sample = ShareTable("granularity"), ShareTable("granularity")
        language = ShareTable("language", dict(data.record_trends), sum(data.record_trends.values()))
        bilingual = cross = agreement_sample = None
        scores = {n: [getattr(s, n) for s in data.scores.values() if getattr(s, n) is not None] for n in SCORE_NAMES}
    site = data.site
    step_human = {k: v for k, v in human.items() if k.checkpoint_step == site.step
                  and (k.layer is None or site.layer is None or k.layer == site.layer)}
    agreement = None
    model = data.model_granularity
    if step_human and model and set(step_human) & set(model):
        from autointerp.human.compare import compare_labels

        agreement = compare_labels(step_human, model).overall
    return {
        "step": site.title, "page": site.name, "tick": site.title, "n_records": data.n_records,
        "n_labels": data.n_labels - (counts.dead if counts else 0), "n_dead_labels": counts.dead if counts else 0,
        "n_sampled": sample.n,
        # labels of only some latents (files from before every latent got a statistical label)
        "partial": bool(data.n_labels and data.n_live > data.n_labels - (counts.dead if counts else 0)),
        "n_live": data.n_live,
        "granularity": granularity, "granularity_sample": sample, "sample_agreement": agreement_sample,
        "language": dict(language.counts), "language_table": language,
        "bilingual_firing": bilingual, "cross_lingual": cross,
        "scores": scores, "scores_noise_labels": counts.scores_noise if counts else 0,
        "n_undescribed": counts.undescribed if counts else 0,
        "metrics": {name: sae_metric(data.metrics, name) for name in SAE_METRICS},
        "core_metrics": metric_rows(data.metrics),
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
                  width=0.8, hatch=None, legend=True, axis: str = "training step") -> None:
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
    ax.set_xlabel(axis)


def _share_bars(ax, summaries: list[dict[str, Any]], tables: list[ShareTable], classes: list[str],
                samples: list[ShareTable] | None = None, axis: str = "training step") -> None:
    """Grouped bars: each class's share per checkpoint with its Wilson 95% interval; the
    LLM-described sample's share as a black diamond beside each bar, where there is one."""
    import numpy as np

    width = 0.8 / max(1, len(classes))
    x = np.arange(len(summaries))
    for j, c in enumerate(classes):
        rows = [t.get(c) for t in tables]
        pos = x - 0.4 + width * (j + 0.5)
        shares = np.array([r.share for r in rows])
        err = np.array([[r.share - r.lo for r in rows], [r.hi - r.share for r in rows]])
        ax.bar(pos, shares, width * 0.92, color=COLORS.get(c, "#999"), label=c, yerr=err, capsize=2,
               error_kw={"elinewidth": 0.8, "ecolor": "#333"})
        if samples:
            points = [(p, t.get(c).share) for p, t in zip(pos, samples) if t.n]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker="D", s=14, color="black",
                           zorder=3, label="LLM sample" if j == 0 else None)
    ax.set_xticks(x, [f"{s['tick']}\n(n={t.n})" for s, t in zip(summaries, tables)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of latents")
    ax.set_xlabel(axis)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))


def make_plots(summaries: list[dict[str, Any]], has_human: bool,
               grey: dict[str, str] | None = None, axis: str = "training step") -> list[dict[str, str]]:
    """The index's figures as {"title", "png" (base64), "alt"}; a figure with no data is left out.
    Shares are over every labelled latent, with Wilson 95% intervals; `grey`: score methods the
    control did not vouch for (drawn grey, titled with why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grey = grey or {}
    plots = []
    steps = [s["tick"] for s in summaries]
    unit = "layer" if axis == "layer" else "checkpoint"
    labelled = [s for s in summaries if s["n_labels"]]

    if labelled:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        classes = list(GRANULARITIES) + (["unlabelled"] if any(s["granularity"].counts.get("unlabelled")
                                                                for s in labelled) else [])
        _share_bars(ax, labelled, [s["granularity"] for s in labelled], classes,
                    [s["granularity_sample"] for s in labelled], axis=axis)
        ax.set_title(f"Granularity of all latents per {unit} (95% Wilson intervals; ◆ LLM sample)")
        plots.append({"title": f"Granularity shares per {unit}", "png": _figure_png(fig),
                      "alt": "bars with 95% intervals: granularity shares of all latents per checkpoint, "
                             "diamonds for the LLM-described sample"})

    with_language = [s for s in summaries if s["language_table"].n]
    if with_language:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        tables = [s["language_table"] for s in with_language]
        _share_bars(ax, with_language, tables, list(LANGUAGE_TRENDS) + (
            ["unknown"] if any(t.counts.get("unknown") for t in tables) else []), axis=axis)
        ax.set_title(f"Language trend of latents per {unit} (95% Wilson intervals)")
        plots.append({"title": f"Language trend shares per {unit}", "png": _figure_png(fig),
                      "alt": "bars with 95% intervals: en/ja/mix shares per checkpoint"})

    with_flags = [s for s in summaries if s["bilingual_firing"] is not None]
    if with_flags:
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 3))
        x = np.arange(len(with_flags))
        for offset, name, color, text in [(-0.2, "bilingual_firing", "#76b7b2", "bilingual firing (max tokens in both scripts ≥ 10%)"),
                                          (0.2, "cross_lingual", "#59a14f", "cross-lingual (en–ja synonym feature)")]:
            rows = [s[name] for s in with_flags]
            ax.bar(x + offset, [r.share for r in rows], 0.38, color=color, label=text,
                   yerr=[[r.share - r.lo for r in rows], [r.hi - r.share for r in rows]], capsize=2)
        ax.set_xticks(x, [f"{s['tick']}\n(n={s['n_labels']})" for s in with_flags])
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of latents")
        ax.set_xlabel(axis)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
        ax.set_title("Bilingual firing vs cross-lingual latents (95% Wilson intervals)")
        plots.append({"title": "Bilingual firing and cross-lingual shares", "png": _figure_png(fig),
                      "alt": "bars with 95% intervals: shares of bilingual-firing and cross-lingual latents"})

    present = [n for n in SCORE_NAMES if any(s["scores"][n] for s in summaries)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
        for ax, name in zip(axes[0], present):
            data = [s["scores"][name] for s in summaries]
            positions = [i for i, d in enumerate(data) if d]
            color = "#bbbbbb" if grey.get(name) else "#333333"
            ax.boxplot([data[i] for i in positions], positions=positions, widths=0.6,
                       boxprops={"color": color}, whiskerprops={"color": color}, capprops={"color": color},
                       medianprops={"color": "#bbbbbb" if grey.get(name) else "#f28e2b"},
                       flierprops={"markeredgecolor": color})
            ax.set_xticks(range(len(steps)), [f"{st}\n(n={len(d)})" for st, d in zip(steps, data)], rotation=45)
            ax.set_title(f"{name} score" + (f" — {grey[name].upper()}" if grey.get(name) else ""),
                         color="#999999" if grey.get(name) else "black")
            ax.set_xlabel(axis)
        fig.tight_layout()
        noisy = [n for n in present if grey.get(n)]
        plots.append({"title": "Score distributions (LLM sample)" + (
                          f": {', '.join(noisy)} greyed ({'; '.join(sorted(set(grey[n] for n in noisy)))})"
                          if noisy else ""),
                      "png": _figure_png(fig), "grey": bool(noisy),
                      "alt": "box plots: simulator scores of the LLM-described sample per checkpoint"})

    metric_names = [m for m in SAE_METRICS if any(s["metrics"][m] is not None for s in summaries)]
    if metric_names:
        fig, axes = plt.subplots(1, len(metric_names), figsize=(3.2 * len(metric_names), 2.8), squeeze=False)
        for ax, name in zip(axes[0], metric_names):
            points = [(i, s["metrics"][name]) for i, s in enumerate(summaries) if s["metrics"][name] is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#f28e2b")
            ax.set_xticks(range(len(steps)), steps, rotation=45)
            ax.set_title(name)
            ax.set_xlabel(axis)
        fig.tight_layout()
        plots.append({"title": f"SAE metrics per {unit}", "png": _figure_png(fig),
                      "alt": "line plots: FVU, L0, dead fraction and delta CE per checkpoint"})

    compared = [s for s in summaries if s["agreement"] is not None]
    if has_human and compared:
        fig, (ax, ax_kappa) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2, 1]})
        names = [s["tick"] for s in compared]
        _stacked_bars(ax, names, [s["agreement"].shares_human for s in compared], list(GRANULARITIES),
                      offset=-0.2, width=0.38, axis=axis)
        _stacked_bars(ax, names, [s["agreement"].shares_model for s in compared], list(GRANULARITIES),
                      offset=0.2, width=0.38, hatch="//", legend=False, axis=axis)
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

    env = jinja2.Environment(loader=jinja2.PackageLoader("autointerp.report.build", "templates"), autoescape=True,
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


def control_view(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The run's shuffled-description control (manifest stages.label.control, else
    stages.score.control; ControlResult.to_dict()'s shape) for the banner on every page, with
    `grey`: the score methods it does not vouch for and why. None when the run has none."""
    stages = manifest.get("stages") or {}
    for stage in ("label", "score"):
        info = stages.get(stage)
        control = info.get("control") if isinstance(info, dict) else None
        if not isinstance(control, dict):
            continue
        methods = []
        for name, m in (control.get("methods") or {}).items():
            m = m if isinstance(m, dict) else {}
            ci = m.get("ci95")
            methods.append({"name": str(name), "metric": m.get("metric"), "n": m.get("n"),
                            "matched": m.get("matched"), "shuffled": m.get("shuffled"), "gap": m.get("gap"),
                            "ci95": list(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
                            "signal": bool(m.get("signal")), "verdict": str(m.get("verdict") or "")})
        noise = bool(control["noise"]) if "noise" in control else not any(m["signal"] for m in methods)
        signal = {m["name"]: m["signal"] for m in methods}
        grey = {}
        for n in SCORE_NAMES:
            if noise or signal.get(n) is False:
                grey[n] = "noise"
            elif n not in signal:
                grey[n] = "no control"
        llm = info.get("llm") if isinstance(info.get("llm"), dict) else {}
        return {"source": f"manifest.json stages.{stage}.control", "noise": noise, "methods": methods,
                "verdict": str(control.get("verdict") or ""), "model": control.get("model") or llm.get("model") or "",
                "n_latents": control.get("n_latents"), "grey": grey}
    return None


NO_CONTROL_GREY = {n: "no control" for n in SCORE_NAMES}


def sample_note(manifest: dict[str, Any], site: runlib.Site | None = None) -> str | None:
    """How the LLM sample was drawn (manifest stages.label.sample; the site's own strata where
    `site` is given and recorded), in words: a stratified sample gives every class at least one
    latent, so a rare class's share in it is high by design."""
    info = ((manifest.get("stages") or {}).get("label") or {}).get("sample")
    if not isinstance(info, dict) or not isinstance(info.get("strata"), dict):
        return None
    own = (info.get("per_checkpoint") or {}).get(site.name) if site is not None else None
    strata = own.get("strata") if isinstance(own, dict) and isinstance(own.get("strata"), dict) else info["strata"]
    where = "" if own else " over all checkpoints"
    strata = ", ".join(f"{k} {v}" for k, v in strata.items())
    return (f"The LLM sample is drawn stratified by the statistical class (seed {info.get('seed', '?')}; "
            f"{strata}{where}): "
            "every class present gets at least one latent, so a rare class's share in the sample lies above its "
            "share over all latents by design.")


def site_axis(sites: list[runlib.Site]) -> str:
    """What the index's x axes count: training steps, layers, or sites of both."""
    if all(s.layer is None for s in sites) or len({s.layer for s in sites}) == 1:
        return "training step"
    return "layer" if len({s.step for s in sites}) == 1 else "site"


def build_report(run_dir: str | Path, human: str | Path | None = None, out_dir: str | Path | None = None,
                 contexts_per_feature: int = 5, window: int = 12, max_features: int | None = None) -> Path:
    """Render RUN/report/index.html and one SITE.html per site; return the index path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    sites = runlib.sites(run)
    axis = site_axis(sites)
    out = Path(out_dir) if out_dir else run / "report"
    human_labels: dict[Key, str] = {}
    comparison = None
    if human is not None:
        from autointerp.human.compare import compare_labels, load_labels

        human_labels = _with_layers(load_labels(human).labels, run, sites)
    out.mkdir(parents=True, exist_ok=True)
    env = _environment()
    step_template = env.get_template("step.html")
    manifest = runlib.read_manifest(run)
    control = control_view(manifest)
    grey = control["grey"] if control else NO_CONTROL_GREY
    note = sample_note(manifest)

    summaries, all_model = [], {}
    synonyms = SynonymTable()
    densities = []
    lineage_view = _lineage_view(run, sites)
    for i, site in enumerate(sites):
        data = read_step(run, site, max_features or DEFAULT_MAX_FEATURES, contexts_per_feature,
                         human_keys=frozenset(human_labels))
        summary = step_summary(data, human_labels)
        if axis == "layer":
            summary["tick"] = str(site.layer)
        elif axis == "training step":
            summary["tick"] = str(site.step)
        summaries.append(summary)
        all_model.update(data.model_granularity)
        synonyms.merge(data.synonyms)
        density = density_png(data.metrics, data.densities, f"{site.title}: firing density")
        densities.append({"title": site.title, "png": density[0], "source": density[1]} if density else None)
        # Labelled latents first (the LLM-described ones, then by class and feature id: read_step's
        # order); records without a label only when the site has no labels or room is left
        # under an explicit --per-page.
        labelled = list(data.labels)
        unlabelled = sorted(set(data.records) - set(data.labels), key=lambda k: k.feature)
        keys = labelled + unlabelled
        shown = keys[:max_features] if max_features else (labelled or unlabelled)[:DEFAULT_MAX_FEATURES]
        features = [feature_view(k, data, human_labels, contexts_per_feature, window, grey) for k in shown]
        for f in features:  # parent at the previous site and children at the next (autointerp lineage)
            f["lineage"] = lineage_view.card(site, f["feature"]) if lineage_view else None
        n_features = len(data.label_keys | data.record_keys)
        prev_site, next_site = (sites[i - 1] if i > 0 else None), (sites[i + 1] if i + 1 < len(sites) else None)
        html = step_template.render(
            run_name=run.resolve().name, site=site.title, summary=summary, features=features,
            n_hidden=n_features - len(shown), classes=list(GRANULARITIES) + ["unlabelled"],
            languages=sorted({f["language"] for f in features}),
            prev=prev_site and {"page": prev_site.name, "title": prev_site.title},
            next=next_site and {"page": next_site.name, "title": next_site.title},
            metrics=data.metrics, sae_metric_names=list(SAE_METRICS), has_human=bool(human_labels),
            control=control, has_scores=any(summary["scores"].values()), grey=grey,
            sample_note=sample_note(manifest, site), density=densities[-1], synonyms=data.synonyms.rows(),
            n_synonyms=data.synonyms.count, metric_columns=metric_columns(),
        )
        (out / f"{site.name}.html").write_text(html, encoding="utf-8")

    if human_labels and all_model and set(human_labels) & set(all_model):
        comparison = compare_labels(human_labels, all_model)
        comparison.human_source, comparison.model_source = str(human), str(run)
        (out / "compare.json").write_text(json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False))
    run_missing = [] if sites else ["sites: no step-N/ or layer-L/ folders (run `autointerp sae` and "
                                    "`autointerp collect`)"]
    if not manifest:
        run_missing.append("manifest.json")
    index = env.get_template("index.html").render(
        run_name=run.resolve().name, run_path=str(run_dir), summaries=summaries,  # the path as given: no machine path
        plots=make_plots(summaries, bool(human_labels), grey, axis), stages=_manifest_rows(manifest),
        model=_manifest_model(manifest), run_missing=run_missing, comparison=comparison,
        classes=list(GRANULARITIES), languages=list(LANGUAGE_TRENDS), sae_metric_names=list(SAE_METRICS),
        has_human=bool(human_labels), human_source=str(human) if human else None,
        lineage=lineage_view, control=control, grey=grey, sample_note=note,
        has_scores=any(any(s["scores"].values()) for s in summaries),
        axis=axis, metric_columns=metric_columns(), densities=[d for d in densities if d],
        synonyms=synonyms.rows(), n_synonyms=synonyms.count,
    )
    index_path = out / "index.html"
    index_path.write_text(index, encoding="utf-8")
    return index_path


def _site_layer(run: Path, site: runlib.Site) -> int | None:
    """The layer a site's SAE reads: its name's, else the first record's, else the first label's."""
    if site.layer is not None:
        return site.layer
    from autointerp.jsonl import iter_lines
    from autointerp.records.lean import record_key

    folder = runlib.site_dir(run, site)
    for path, layer_of in ((runlib.records_file(folder), lambda line: record_key(line)[0].layer),
                           (folder / "labels.jsonl", lambda line: Label.from_dict(json.loads(line)).layer)):
        if path.exists():
            for _, line in iter_lines(path, binary=True):
                if (layer := layer_of(line)) is not None:
                    return layer
                break
    return None


def _with_layers(labels: dict[Key, str], run: Path, sites: list[runlib.Site]) -> dict[Key, str]:
    """Human labels that name no layer (a CSV, an older file) take the layer of the run's SAE at
    their step, where each step has one."""
    if not labels or any(k.layer is not None for k in labels):
        return labels
    layers: dict[int | None, set] = {}
    for site in sites:
        layers.setdefault(site.step, set()).add(_site_layer(run, site))
    return {Key(k.checkpoint_step, next(iter(layers[k.checkpoint_step])), k.feature)
            if len(layers.get(k.checkpoint_step, ())) == 1 else k: v for k, v in labels.items()}


def _lineage_view(run: Path, sites: list[runlib.Site]):
    """The lineage section and card links, or None when `autointerp lineage` has not run."""
    from autointerp.lineage import view as lineage

    return lineage.report_view(run, sites)


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
    max_features: int | None = typer.Option(None, "--per-page", min=1,
                                            help="At most this many feature cards per checkpoint page: the "
                                                 "LLM-described latents first, then the others by feature id "
                                                 f"(default {DEFAULT_MAX_FEATURES}; without labels, records). "
                                                 "Shares always count every latent."),
) -> None:
    """Render the HTML report: RUN_DIR/report/index.html and one page per checkpoint (or layer)."""
    from autointerp.files import Kind, expect

    expect(run_dir, Kind.RUN)
    index = build_report(run_dir, human, out, contexts, window, max_features)
    pages = [index.parent / f"{site.name}.html" for site in runlib.sites(run_dir)]
    pages = [p for p in pages if p.exists()]
    size = sum(p.stat().st_size for p in [index, *pages]) / 1e6
    kind = "layer" if site_axis(runlib.sites(run_dir)) == "layer" else "checkpoint"
    print(f"wrote {index} and {len(pages)} {kind} pages ({size:.1f} MB)")
