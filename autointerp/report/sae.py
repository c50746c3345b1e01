"""The report's per-SAE views: the core metrics the field reports, the firing-density histogram,
and the concept-synonym latents with the English and Japanese words that join them.

    rows = metric_rows(metrics)            # SAEBench's core metrics (SAELens's definitions), SITE/sae/metrics.json
    png = density_png(metrics, densities)  # log-scale firing-density histogram (base64 PNG)
    table = SynonymTable(20); table.add(label, page); table.rows()
"""

from __future__ import annotations

import heapq
import math
from typing import Any

from autointerp.report.plots import figure_png
from autointerp.schema import Label

# (keys in metrics.json, column title, format, what it says): SAEBench's core metrics by SAELens's
# definitions (autointerp.sae.metrics.DEFINITIONS), then autointerp's own, named apart
CORE_METRICS = [
    (("explained_variance",), "explained variance", "{:.3f}",
     "SAELens: 1 - FVU of the layer output as the LM produces it"),
    (("l0",), "L0", "{:.1f}", "SAELens: active latents per token"),
    (("dead_fraction",), "dead", "{:.1%}", "SAEBench: latents that never fire on the held-out tokens (1 - frac_alive)"),
    (("dense_fraction",), "dense", "{:.1%}", "SAEBench: latents firing on more than 10% of tokens"),
    (("ce_loss_score",), "CE loss score", "{:.1%}",
     "SAELens: share of the loss gap to zero-ablation (every position) the SAE recovers"),
    (("kl_div_with_sae",), "KL div", "{:.3f}",
     "SAELens: KL divergence of the LM's next-token distribution, SAE spliced in vs clean"),
    (("kl_div_score",), "KL div score", "{:.1%}", "SAELens: 1 - KL(SAE) / KL(zero-ablated)"),
    (("cossim", "cosine_similarity"), "cosine", "{:.3f}", "SAELens: cosine of reconstruction and activation"),
    (("l2_ratio",), "L2 ratio", "{:.3f}", "SAELens: ||reconstruction|| / ||activation||"),
    (("delta_ce",), "ΔCE", "{:+.3f}", "autointerp: LM loss with the SAE spliced in minus without"),
    (("explained_variance_unit_norm",), "EV unit-norm", "{:.3f}",
     "autointerp: explained variance on the unit-norm inputs the SAE trains on"),
]


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """The core metrics as {"name", "value", "what"}; "–" where metrics.json lacks one, or holds it
    by an earlier definition."""
    from autointerp.sae.metrics import by_current_definitions

    current = by_current_definitions(metrics)
    out = []
    for keys, name, fmt, what in CORE_METRICS:
        value = next((current[k] for k in keys if k in current), None)
        if keys[0] in metrics and keys[0] not in current:
            what = f"{what} (this metrics.json predates it: rerun `autointerp sae metrics SAE_DIR --write`)"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        out.append({"key": keys[0], "name": name, "value": fmt.format(value) if ok else "–", "what": what})
    return out


def metric_columns() -> list[tuple[str, str]]:
    return [(name, what) for _, name, _, what in CORE_METRICS]


def density_png(metrics: dict[str, Any], densities: list[float] | None = None, title: str = "") -> tuple[str, str] | None:
    """(base64 PNG, source) of the latents' log10 firing densities: from metrics.json's
    density_histogram (held-out tokens), else from the records' densities (the whole corpus);
    None when neither is there. Dead latents stand apart on the left; the dense line is marked."""
    from autointerp.sae.metrics import DENSE

    hist = metrics.get("density_histogram")
    if isinstance(hist, dict) and hist.get("counts"):
        edges, counts, never = hist["log10_edges"], hist["counts"], int(hist.get("never", 0))
        source = f"SAE metrics ({metrics.get('eval_tokens', '?')} held-out tokens)"
    elif densities:
        from autointerp.sae.metrics import density_histogram
        import torch

        hist = density_histogram(torch.tensor(densities, dtype=torch.float64))
        edges, counts, never = hist["log10_edges"], hist["counts"], hist["never"]
        source = f"feature records ({len(densities)} latents, the whole corpus)"
    else:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="#4e79a7", edgecolor="white")
    step = widths[0] if widths else 0.5
    dead_at = edges[0] - 2.5 * step  # apart from the bins, on the left
    ax.bar([dead_at], [never], width=step, color="#bab0ac", edgecolor="white", align="edge")
    ax.axvline(math.log10(DENSE), color="#e15759", linestyle="--", linewidth=1)
    ax.text(math.log10(DENSE), max([*counts, never, 1]) * 0.95, " dense", color="#e15759", fontsize=7, va="top")
    ticks = [e for e in edges if float(e).is_integer()]
    ax.set_xticks([dead_at + step / 2] + ticks, ["dead"] + [f"1e{int(t)}" if t else "1" for t in ticks], fontsize=7)
    ax.set_xlabel("share of tokens a latent fires on (log scale)")
    ax.set_ylabel("latents")
    ax.set_title(title or "firing density", fontsize=9)
    fig.tight_layout()
    return figure_png(fig), source


def is_dead(label: Label) -> bool:
    """A label line for a latent with no contexts (`score --stats-only` wrote those): not a class."""
    profile = label.language_profile or {}
    return "n_contexts" in profile and not profile["n_contexts"]


def link_cells(link: dict | None) -> dict[str, Any]:
    """A synonym table row's link columns from a label's evidence["link"]: the two linked words
    (the top word and its largest partner), what links them, and the share of the firing
    contexts the words of that meaning cover; 'no dictionary link' where the label has none."""
    if not link or not link.get("partners"):
        return {"first": None, "second": None, "link": "no dictionary link", "covers": None}
    from autointerp.labels.language import clean_token

    covered, of = int(link.get("covered") or 0), int(link.get("of") or 0)
    return {"first": clean_token(link["words"][0][0]), "second": clean_token(link["partners"][0][0][0]),
            "link": link.get("text") or link.get("source") or "linked",
            "covers": f"{covered}/{of} ({covered / of:.0%})" if of else None}


class SynonymTable:
    """The top `size` concept-synonym latents by confidence, streamed (a heap), with the link the
    label found (its evidence["link"]: the two words, what links them, and how many of the firing
    contexts the words of that meaning cover), read from the label, never recomputed here."""

    def __init__(self, size: int = 20):
        self.size, self.heap = size, []
        self.count = 0

    def add(self, label: Label, page: str, site: str) -> None:
        if label.granularity != "concept-synonym" or is_dead(label):
            return
        self.count += 1
        evidence = label.evidence or {}
        share = evidence.get("features", {}).get("top1_share", 0.0) if isinstance(evidence.get("features"), dict) else 0.0
        item = ((round(label.confidence, 6), share, -label.feature), self.count,
                {"feature": label.feature, "page": page, "site": site, "confidence": label.confidence,
                 "cross_lingual": label.cross_lingual, "summary": label.evidence_summary,
                 **link_cells(evidence.get("link"))})
        heapq.heappush(self.heap, item)
        if len(self.heap) > self.size:
            heapq.heappop(self.heap)

    def rows(self) -> list[dict[str, Any]]:
        return [row for _, _, row in sorted(self.heap, key=lambda x: (x[0], -x[1]), reverse=True)]

    def merge(self, other: "SynonymTable") -> None:
        """Fold another site's table in: the top `size` of both, every latent counted."""
        for key, _, row in other.heap:
            self.count += 1
            heapq.heappush(self.heap, (key, self.count, row))
            if len(self.heap) > self.size:
                heapq.heappop(self.heap)
        self.count += other.count - len(other.heap)
