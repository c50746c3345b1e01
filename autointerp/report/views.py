"""The report's view models: what the templates render, as plain dicts and lists.

    feature_view(key, data, human, n_contexts, window, grey)  # one feature card
    step_summary(data, human)                                  # a site's shares, scores, metrics
    control_view(manifest); sample_note(manifest, site)        # the banner and the sample's note
    manifest_rows(manifest); manifest_model(manifest)          # the index's stage table and model
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from autointerp import run as runlib
from autointerp.display import shown
from autointerp.labels.language import profile as language_profile
from autointerp.labels.shares import ShareTable, sample_agreement
from autointerp.report.names import SAE_METRICS, SCORE_NAMES
from autointerp.report.read import StepData, described, sae_metric, score_value
from autointerp.report.sae import metric_rows
from autointerp.schema import GRANULARITIES, Key, Scores

# --- per-feature view models -----------------------------------------------------------------

def context_window(context, window: int) -> dict[str, Any]:
    """Tokens within `window` of the max token, as (text, level, activation) for shading."""
    i = context.max_index
    start, end = max(0, i - window), min(len(context.tokens), i + window + 1)
    acts = context.activations
    tokens = [{"text": shown(context.tokens[j], "html"), "level": max(0, min(10, context.levels[j])),
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
        value = score_value(scores, name)
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


# --- per-checkpoint summaries ----------------------------------------------------------------

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


# --- the run: its control, its LLM sample, its manifest --------------------------------------

def manifest_rows(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """The index's table of stages: each one's name, when it finished and how long it took."""
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
    `grey`: every score method, mapped to why it is greyed ("noise", "too few latents", "no
    control") or to None where the control vouches for it, and `vouched` / `summary`: the same in
    words. None when the run has none."""
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
                            "p": m.get("p"), "p_holm": m.get("p_holm"),
                            "signal": bool(m.get("signal")), "verdict": str(m.get("verdict") or "")})
        by_name = {m["name"]: m for m in methods}
        min_latents = control.get("min_latents") if isinstance(control.get("min_latents"), int) else 0
        grey: dict[str, str | None] = {}
        for n in SCORE_NAMES:
            m = by_name.get(n)
            if m is None:
                grey[n] = "no control"
            elif m["signal"]:
                grey[n] = None
            elif m["gap"] is None or (m["n"] or 0) < min_latents:
                grey[n] = "too few latents"
            else:
                grey[n] = "noise"
        vouched = [n for n in SCORE_NAMES if grey[n] is None]
        llm = info.get("llm") if isinstance(info.get("llm"), dict) else {}
        return {"source": f"manifest.json stages.{stage}.control", "noise": not vouched, "methods": methods,
                "verdict": str(control.get("verdict") or ""), "model": control.get("model") or llm.get("model") or "",
                "n_latents": control.get("n_latents"), "grey": grey, "vouched": vouched,
                "summary": _control_summary(grey), "rule": str(control.get("rule") or "")}
    return None


def _control_summary(grey: dict[str, str | None]) -> str:
    """Which scores the control vouches for and which are greyed, in one sentence."""
    vouched = [n for n, why in grey.items() if why is None]
    greyed = [n for n, why in grey.items() if why is not None]
    reasons = "; ".join(f"{why}: {', '.join(n for n in greyed if grey[n] == why)}"
                        for why in dict.fromkeys(grey[n] for n in greyed))
    if not vouched:
        return f"The control vouches for no score: all are greyed ({reasons}) and none enters the granularity decision."
    words = " and ".join(vouched) if len(vouched) <= 2 else ", ".join(vouched[:-1]) + " and " + vouched[-1]
    tail = f"; the others are greyed ({reasons}) and stay out of it" if greyed else ""
    return (f"The control vouches for {words}: shown as information and used by the granularity decision"
            f"{tail}.")


NO_CONTROL_GREY: dict[str, str | None] = {n: "no control" for n in SCORE_NAMES}


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


def manifest_model(manifest: dict[str, Any]) -> str | None:
    """The model the run's stages name (the first that names one), else the manifest's own."""
    for stage in (manifest.get("stages") or {}).values():
        if isinstance(stage, dict) and isinstance(stage.get("model"), str):
            return stage["model"]
    return manifest.get("model") if isinstance(manifest.get("model"), str) else None
