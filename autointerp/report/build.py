"""Static HTML reports: RUN/report/index.html across sites and RUN/report/SITE.html per site
(SITE: step-N for a checkpoint, layer-L for a layer of one model; run.Site).

    autointerp report RUN_DIR [--human FILE]        (report/cli.py)
    build_report(run_dir, human=None)               -> RUN/report/index.html

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

import json
from pathlib import Path

from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.report.names import SAE_METRICS
from autointerp.report.plots import make_plots
from autointerp.report.read import read_step, site_layer
from autointerp.report.sae import SynonymTable, density_png, metric_columns
from autointerp.report.views import (NO_CONTROL_GREY, control_view, feature_view, manifest_model, manifest_rows,
                                     sample_note, step_summary)
from autointerp.schema import GRANULARITIES, LANGUAGE_TRENDS, Key

# A checkpoint page lists at most this many features by default: a whole SAE (32,768 latents)
# on one page would be hundreds of MB of HTML; the page says how many it leaves out.
DEFAULT_MAX_FEATURES = 1000


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("autointerp.report.build", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = lambda x, d=3: "–" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))
    env.filters["num"] = lambda x: "–" if x is None else f"{x:.4g}"
    return env


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
        plots=make_plots(summaries, bool(human_labels), grey, axis), stages=manifest_rows(manifest),
        model=manifest_model(manifest), run_missing=run_missing, comparison=comparison,
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


def _with_layers(labels: dict[Key, str], run: Path, sites: list[runlib.Site]) -> dict[Key, str]:
    """Human labels that name no layer (a CSV, an older file) take the layer of the run's SAE at
    their step, where each step has one."""
    if not labels or any(k.layer is not None for k in labels):
        return labels
    layers: dict[int | None, set] = {}
    for site in sites:
        layers.setdefault(site.step, set()).add(site_layer(run, site))
    return {Key(k.checkpoint_step, next(iter(layers[k.checkpoint_step])), k.feature)
            if len(layers.get(k.checkpoint_step, ())) == 1 else k: v for k, v in labels.items()}


def _lineage_view(run: Path, sites: list[runlib.Site]):
    """The lineage section and card links, or None when `autointerp lineage` has not run."""
    from autointerp.lineage import view as lineage

    return lineage.report_view(run, sites)
