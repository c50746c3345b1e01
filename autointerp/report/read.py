"""Reading a run directory for the report: a site's labels, records, explanations, scores and
SAE metrics, streamed so memory does not grow with the number of latents.

    data = read_step(run, site, max_records=1000, max_contexts=5)   # StepData
    data.counts                                                      # StepCounts over every label line
    sae_metric(data.metrics, "FVU")

A stage that has not run is named in `data.missing`; a bad line in `data.warnings`, not fatal.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autointerp import run as runlib
from autointerp.jsonl import iter_jsonl
from autointerp.labels.language import trend as language_trend
from autointerp.labels.shares import ShareCounter
from autointerp.records.lean import stream_lean_records
from autointerp.report.names import SAE_METRICS, SCORE_NAMES
from autointerp.report.sae import SynonymTable, is_dead
from autointerp.schema import GRANULARITIES, Explanation, FeatureRecord, Key, Label, Scores

GRANULARITY_ORDER = {g: i for i, g in enumerate(GRANULARITIES)}  # the order of a page's cards


def described(label: Label) -> bool:
    """In the LLM-described sample: `sampled`, or a description (files from before `sampled`
    held labels for the LLM sample only)."""
    return label.sampled or bool((label.description or "").strip())


def score_value(scores: dict[str, Any], name: str) -> float | None:
    """A score method's value in a label's scores, as a float; None when absent or not a number."""
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
                value = score_value(label.scores, name)
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
    data = StepData(site=site, layer=site_layer(run, site))
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


def site_layer(run: Path, site: runlib.Site) -> int | None:
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
