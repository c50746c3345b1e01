"""Reading lineage results: each latent's class at a site, the transition matrices, the report's
lineage section and card links, and the flow figure."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from autointerp import run as runlib
from autointerp.display import shown
from autointerp.jsonl import iter_jsonl
from autointerp.lineage.match import LineageRow, pair_title
from autointerp.lineage.sites import META_FILE, ROWS_FILE
from autointerp.schema import GRANULARITIES, FeatureRecord, Label

NEW = "new"


# --------------------------------------------------------------------------- reading results

def read_rows(run: Path, site: runlib.Site) -> list[LineageRow]:
    path = runlib.site_dir(run, site) / ROWS_FILE
    return list(iter_jsonl(path, LineageRow.from_dict, on_error="skip")) if path.exists() else []


def read_meta(run: Path, site: runlib.Site) -> dict[str, Any] | None:
    path = runlib.site_dir(run, site) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class LatentClass:
    granularity: str
    source: str  # "label" or "stats" (the statistical decision over the record, no LLM)
    top_tokens: list[str] = field(default_factory=list)


CLASSES_CACHE = "lineage.classes.json"
CLASSES_CACHE_VERSION = 3  # 3: top tokens through display.shown (no '▁' on the page)


def _shown(token: str) -> str:
    """A max token as the card (HTML) shows it: display.shown's html rule, a blank token as ␣."""
    token = shown(token, "html")
    return token if token.strip() else "␣" * max(len(token), 1)


def latent_classes(run: Path, site: runlib.Site) -> dict[int, LatentClass]:
    """Every latent's granularity at `site`: its label where labelled, else the statistical
    decision over its record (granularity.decide with no LLM input), so counts cover all latents.

    Cached in SITE/lineage.classes.json, keyed on the sizes and times of the records file and
    labels.jsonl (reading 2,048 records and deciding takes ~15 s on the demo)."""
    from autointerp.labels import decision as granularity

    folder = runlib.site_dir(run, site)
    sources = [runlib.records_file(folder), folder / "labels.jsonl"]
    key = [CLASSES_CACHE_VERSION] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sources if p.exists()]
    cache = folder / CLASSES_CACHE
    if cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return {int(f): LatentClass(**c) for f, c in saved["classes"].items()}
        except (ValueError, TypeError, KeyError):
            pass  # a torn or old cache: recompute
    labels: dict[int, Label] = {}
    if sources[1].exists():
        labels = {l.feature: l for l in iter_jsonl(sources[1], Label.from_dict, on_error="skip")}
    out: dict[int, LatentClass] = {}
    if sources[0].exists():
        for record in iter_jsonl(sources[0], FeatureRecord.from_dict, on_error="skip"):
            label = labels.get(record.feature)
            if label is not None and label.granularity:
                tokens = [_shown(t) for t, _ in (label.evidence or {}).get("top_tokens", [])][:3]
                out[record.feature] = LatentClass(label.granularity, "label", tokens)
                continue
            cls, _, evidence = granularity.decide(record)
            out[record.feature] = LatentClass(cls, "stats", [_shown(t) for t, _ in evidence.get("top_tokens", [])][:3])
    for feature, label in labels.items():
        if feature not in out and label.granularity:
            out[feature] = LatentClass(label.granularity, "label", [])
    if len(key) > 1:
        try:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "classes": {f: c.__dict__ for f, c in out.items()}},
                                      ensure_ascii=False))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only run: no cache, same answer
    return out


def transition_matrix(rows: Iterable[LineageRow], class_a: dict[int, str], class_b: dict[int, str]) -> dict[str, dict[str, int]]:
    """Counts {parent class (or "new") -> {class at B -> latents}} over the given rows of B
    (every live latent of B once, so the counts add up to len(rows)); "unknown" where a class is missing."""
    counts: dict[str, Counter] = {}
    for r in rows:
        src = NEW if r.new else class_a.get(r.parent_feature, "unknown")  # type: ignore[arg-type]
        counts.setdefault(src, Counter())[class_b.get(r.feature, "unknown")] += 1
    return {src: dict(c) for src, c in counts.items()}


def _order(names: Iterable[str]) -> list[str]:
    known = list(GRANULARITIES) + ["unknown", NEW]
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


# --------------------------------------------------------------------------- the report's view

@dataclass
class LineageReport:
    """What the report shows: per-pair summaries and matrices, the flow figure, per-feature links."""

    pairs: list[dict[str, Any]]
    figure_png: str | None                                  # base64 PNG
    cards: dict[tuple[runlib.Site, int], dict[str, Any]]    # (site, feature) -> {"parent", "children"}

    next_site: dict[runlib.Site, runlib.Site] = field(default_factory=dict)  # A -> B for every pair

    def card(self, site: runlib.Site, feature: int) -> dict[str, Any] | None:
        """A feature card's lineage: parent (or new) at the previous site, children at the next."""
        found = self.cards.get((site, feature), {})
        nxt = self.next_site.get(site)
        if not found and nxt is None:
            return None
        return {"parent": None, "new": None, "parent_site": None, "correlation": None, "threshold": None,
                "children": [], "n_children": 0, **found, "children_site": nxt.title if nxt else None}


def report_view(run: Path, sites: Sequence[runlib.Site], max_children: int = 8) -> LineageReport | None:
    """The lineage part of the report, or None when `autointerp lineage` has not run."""
    run = Path(run)
    pairs, cards = [], {}
    classes: dict[runlib.Site, dict[int, LatentClass]] = {}

    def classes_at(site: runlib.Site) -> dict[int, LatentClass]:
        if site not in classes:
            classes[site] = latent_classes(run, site)
        return classes[site]

    for site in sites:
        meta, rows = read_meta(run, site), read_rows(run, site)
        if meta is None or not rows:
            continue
        parent = runlib.Site.parse(meta.get("parent_site") or "") or next(  # a meta written before sites
            (s for s in sites if s.step == meta.get("parent_step") and s.layer in (None, meta.get("parent_layer"))),
            runlib.Site(meta.get("parent_step")))
        ca, cb = classes_at(parent), classes_at(site)
        matrix = transition_matrix(rows, {f: c.granularity for f, c in ca.items()},
                                   {f: c.granularity for f, c in cb.items()})
        n_children = Counter(r.parent_feature for r in rows if not r.new)
        sources = Counter(cb[r.feature].source if r.feature in cb else "none" for r in rows)
        continued = [r.correlation for r in rows if not r.new]
        pairs.append({
            "parent": parent, "site": site, "parent_title": parent.title, "title": site.title,
            "pair_title": pair_title(meta).replace("->", "→"), "meta": meta, "matrix": matrix,
            "rows_order": _order(matrix), "cols_order": _order(k for row in matrix.values() for k in row),
            "col_totals": dict(sum((Counter(row) for row in matrix.values()), Counter())),
            "live": len(rows), "new": sum(r.new for r in rows), "continued": len(continued),
            "median_corr": float(torch.tensor(continued).median()) if continued else None,
            "parents_with_children": len(n_children), "splits": sum(1 for v in n_children.values() if v > 1),
            "live_a": meta.get("live_a"), "ended": max(0, (meta.get("live_a") or 0) - len(n_children)),
            "class_sources": dict(sources),
        })
        children: dict[int, list[LineageRow]] = {}
        for r in rows:
            link = None
            if not r.new and r.parent_feature is not None:
                children.setdefault(r.parent_feature, []).append(r)
                pc = ca.get(r.parent_feature)
                link = {"site": parent.title, "page": parent.name, "feature": r.parent_feature,
                        "correlation": r.correlation, "margin": r.margin, "granularity": pc.granularity if pc else None,
                        "tokens": pc.top_tokens if pc else []}
            cards.setdefault((site, r.feature), {}).update({"parent": link, "new": r.new, "correlation": r.correlation,
                                                            "threshold": r.threshold, "parent_site": parent.title,
                                                            "candidate": r.candidate_feature})
        for parent_feature, kids in children.items():
            card = cards.setdefault((parent, parent_feature), {})
            kids = sorted(kids, key=lambda r: -r.correlation)
            card["n_children"] = len(kids)
            card["children"] = [{"site": site.title, "page": site.name, "feature": r.feature,
                                 "correlation": r.correlation,
                                 "granularity": cb[r.feature].granularity if r.feature in cb else None,
                                 "tokens": cb[r.feature].top_tokens if r.feature in cb else []}
                                for r in kids[:max_children]]
    if not pairs:
        return None
    return LineageReport(pairs, flow_figure(pairs), cards, {p["parent"]: p["site"] for p in pairs})


_FLOW_COLORS = {"token": "#4e79a7", "concept-synonym": "#59a14f", "concept-semantic": "#edc948",
                "uninterpretable": "#bab0ac", "unknown": "#dddddd", NEW: "#e15759"}


def flow_figure(pairs: list[dict[str, Any]], path: str | Path | None = None) -> str:
    """An alluvial panel per pair A -> B: on the left every live latent of B stacked by its parent's
    class at A (or "new"), on the right by its own class at B, bands = transition counts.
    Returns the PNG as base64 (and writes it to `path` when given)."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import PathPatch, Rectangle
    from matplotlib.path import Path as MPath

    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        matrix, total = pair["matrix"], pair["live"]
        left_names, right_names = pair["rows_order"], pair["cols_order"]
        gap = 0.015 * total
        w = 0.12

        def stack(names, sizes):
            pos, y = {}, 0.0
            for name in names:
                pos[name] = y
                y += sizes[name] + gap
            return pos

        left_size = {s: sum(matrix.get(s, {}).values()) for s in left_names}
        right_size = {d: sum(matrix.get(s, {}).get(d, 0) for s in left_names) for d in right_names}
        left_pos, right_pos = stack(left_names, left_size), stack(right_names, right_size)
        left_fill, right_fill = dict(left_pos), dict(right_pos)
        for s in left_names:
            for d in right_names:
                n = matrix.get(s, {}).get(d, 0)
                if not n:
                    continue
                y0, y1 = left_fill[s], right_fill[d]
                left_fill[s] += n
                right_fill[d] += n
                verts = [(w, y0), (0.5, y0), (0.5, y1), (1 - w, y1), (1 - w, y1 + n), (0.5, y1 + n),
                         (0.5, y0 + n), (w, y0 + n), (w, y0)]
                codes = [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4, MPath.LINETO, MPath.CURVE4,
                         MPath.CURVE4, MPath.CURVE4, MPath.CLOSEPOLY]
                ax.add_patch(PathPatch(MPath(verts, codes), facecolor=_FLOW_COLORS.get(s, "#999"), alpha=0.45,
                                       edgecolor="none"))
        for names, pos, size, x in ((left_names, left_pos, left_size, 0.0), (right_names, right_pos, right_size, 1 - w)):
            for name in names:
                if not size[name]:
                    continue
                ax.add_patch(Rectangle((x, pos[name]), w, size[name], facecolor=_FLOW_COLORS.get(name, "#999"),
                                       edgecolor="white"))
            # labels at their segment's middle, pushed apart where small segments would overlap
            label_y, min_sep = [], 0.055 * (total + gap * len(names))
            for name in names:
                if size[name]:
                    y = pos[name] + size[name] / 2
                    label_y.append([name, max(y, label_y[-1][1] + min_sep) if label_y else y])
            for name, y in label_y:
                ax.text(-0.02 if x == 0 else 1.02, y, f"{name} {size[name]}", va="center",
                        ha="right" if x == 0 else "left", fontsize=8)
        height = total + gap * max(len(left_names), len(right_names))
        ax.set_xlim(-0.55, 1.55)
        ax.set_ylim(height, -gap)
        ax.axis("off")
        ax.set_title(f"{pair['pair_title']}\n{total} live latents of {pair['title']}, {pair['new']} new", fontsize=9)
        ax.text(w / 2, height + gap * 0.5, f"parent at {pair['parent_title']}", ha="center", va="top", fontsize=8)
        ax.text(1 - w / 2, height + gap * 0.5, f"at {pair['title']}", ha="center", va="top", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    if path is not None:
        Path(path).write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")
