"""The report's figures as base64 PNGs: the index's plots over sites, and `figure_png`, which
the other figures (report/sae.py's density histogram) use too.

    plots = make_plots(summaries, has_human, grey, axis)  # [{"title", "png", "alt"}, ...]
    png = figure_png(fig)                                 # closes the figure
"""

from __future__ import annotations

import base64
import io
from typing import Any

from autointerp.labels.shares import ShareTable
from autointerp.report.names import SAE_METRICS, SCORE_NAMES
from autointerp.schema import GRANULARITIES, LANGUAGE_TRENDS

COLORS = {"token": "#4e79a7", "concept-synonym": "#59a14f", "concept-semantic": "#edc948",
          "uninterpretable": "#bab0ac", "en": "#4e79a7", "ja": "#e15759", "mix": "#b07aa1"}


def figure_png(fig) -> str:
    """A matplotlib figure as a base64 PNG (90 dpi, tight bounding box); closes the figure."""
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
        plots.append({"title": f"Granularity shares per {unit}", "png": figure_png(fig),
                      "alt": "bars with 95% intervals: granularity shares of all latents per checkpoint, "
                             "diamonds for the LLM-described sample"})

    with_language = [s for s in summaries if s["language_table"].n]
    if with_language:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        tables = [s["language_table"] for s in with_language]
        _share_bars(ax, with_language, tables, list(LANGUAGE_TRENDS) + (
            ["unknown"] if any(t.counts.get("unknown") for t in tables) else []), axis=axis)
        ax.set_title(f"Language trend of latents per {unit} (95% Wilson intervals)")
        plots.append({"title": f"Language trend shares per {unit}", "png": figure_png(fig),
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
        plots.append({"title": "Bilingual firing and cross-lingual shares", "png": figure_png(fig),
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
                      "png": figure_png(fig), "grey": bool(noisy),
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
        plots.append({"title": f"SAE metrics per {unit}", "png": figure_png(fig),
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
        plots.append({"title": "Model vs human labels", "png": figure_png(fig),
                      "alt": "stacked bars of human and model granularity shares, and kappa per checkpoint"})
    return plots
