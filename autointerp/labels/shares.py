"""Class shares with Wilson 95% intervals, counted over a stream of labels.

    table = class_shares(iter_jsonl(path, Label.from_dict))             # every latent
    sample = class_shares(labels, where=lambda l: l.sampled)             # the LLM-described sample
    print(sample_agreement(table, sample))

Only counts are kept, so a 32,768-latent checkpoint costs a few integers. `ShareCounter` counts
several fields (or subsets) in one pass over the labels; `class_shares` is one counter run to
the end. The Wilson score interval (Wilson 1927; Newcombe 1998's method 3) is used rather than
the normal approximation because shares near 0 or 1 from small samples are common here (the
LLM sample of a demo holds 8 latents) and the normal interval leaves [0, 1] or collapses to a
point there.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

MISSING = "unlabelled"  # the class of a label whose field is None / absent


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials; (0.0, 1.0) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # k == 0 / k == n make the bound exactly 0 / 1 in exact arithmetic; clip the rounding
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


@dataclass(frozen=True)
class Share:
    """One class: its count among n, the share and its Wilson 95% interval."""

    name: Any
    count: int
    n: int
    share: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, "count": self.count, "n": self.n, "share": self.share,
                "ci95": [self.lo, self.hi]}


@dataclass
class ShareTable:
    """Counts per class among n labels; shares and intervals are computed on demand from them."""

    field: str
    counts: dict[Any, int] = field(default_factory=dict)
    n: int = 0

    def get(self, name: Any) -> Share:
        """A class's share, zero (with its interval) for a class never seen."""
        k = self.counts.get(name, 0)
        lo, hi = wilson(k, self.n)
        return Share(name, k, self.n, k / self.n if self.n else 0.0, lo, hi)

    def rows(self, classes: Iterable[Any] | None = None) -> list[Share]:
        """Shares of `classes` in that order (absent ones at 0), then any other class seen, by count."""
        order = list(classes or [])
        order += sorted((c for c in self.counts if c not in order), key=lambda c: (-self.counts[c], str(c)))
        return [self.get(c) for c in order]

    def shares(self) -> dict[Any, float]:
        return {c: k / self.n for c, k in self.counts.items()} if self.n else {}

    def to_dict(self, classes: Iterable[Any] | None = None) -> dict[str, Any]:
        return {"field": self.field, "n": self.n, "classes": [s.to_dict() for s in self.rows(classes)]}


def _value(label: Any, name: str) -> Any:
    value = label.get(name) if isinstance(label, dict) else getattr(label, name, None)
    return MISSING if value is None else value


class ShareCounter:
    """Counts one field's classes over labels fed one at a time (optionally only those `where` holds)."""

    def __init__(self, field: str = "granularity", where: Callable[[Any], bool] | None = None):
        self.field, self.where = field, where
        self.counts: Counter = Counter()
        self.n = 0

    def add(self, label: Any) -> None:
        if self.where is not None and not self.where(label):
            return
        value = _value(label, self.field)
        self.counts[value if isinstance(value, Hashable) else str(value)] += 1
        self.n += 1

    def table(self) -> ShareTable:
        return ShareTable(self.field, dict(self.counts), self.n)


def class_shares(labels: Iterable[Any], field: str = "granularity",
                 where: Callable[[Any], bool] | None = None) -> ShareTable:
    """Counts, n, share and Wilson 95% interval per class of `field` (a Label attribute or dict
    key; None counts as "unlabelled") over labels, streamed: the iterable is read once."""
    counter = ShareCounter(field, where)
    for label in labels:
        counter.add(label)
    return counter.table()


def is_sampled(label: Any) -> bool:
    """The latent is in the LLM-described sample (schema.Label.sampled; False in old files)."""
    return bool(_value(label, "sampled") is True)


@dataclass
class ClassAgreement:
    name: Any
    all: Share
    sample: Share
    inside: bool  # the all-latent share lies in the sample's 95% interval


@dataclass
class Agreement:
    """How the sample's shares compare with all latents': per class, whether the all-latent share
    lies inside the sample's Wilson interval, and the total variation distance between the two."""

    field: str
    classes: list[ClassAgreement]
    total_variation: float | None  # half the summed |share differences|; None with an empty side
    n_all: int
    n_sample: int

    @property
    def differing(self) -> list[ClassAgreement]:
        return [c for c in self.classes if not c.inside]

    @property
    def agrees(self) -> bool:
        return self.n_all > 0 and self.n_sample > 0 and not self.differing

    def summary(self) -> str:
        """One line in words, e.g. for the CLI's end and the report."""
        if not self.n_sample:
            return f"no LLM-described sample ({self.n_all} latents in all)"
        if not self.n_all:
            return f"no latents to compare the sample of {self.n_sample} with"
        head = (f"sample of {self.n_sample} vs all {self.n_all} latents: total variation "
                f"{self.total_variation:.2f}")
        if self.agrees:
            return (f"{head}; every class's share over all latents lies inside the sample's 95% interval "
                    "(the sample is consistent with the whole)")
        differ = ", ".join(f"{c.name} {c.sample.share:.0%} (95% CI {c.sample.lo:.0%}–{c.sample.hi:.0%}) vs "
                           f"{c.all.share:.0%}" for c in self.differing)
        return f"{head}; the sample differs in {differ}"

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "n_all": self.n_all, "n_sample": self.n_sample,
                "total_variation": self.total_variation, "agrees": self.agrees, "summary": self.summary(),
                "classes": [{"class": c.name, "all": c.all.to_dict(), "sample": c.sample.to_dict(),
                             "inside": c.inside} for c in self.classes]}


def sample_agreement(all_table: ShareTable, sample_table: ShareTable,
                     classes: Iterable[Any] | None = None) -> Agreement:
    """Compare a sample's class shares with all latents' (see Agreement). Classes: `classes` in
    order, then any seen on either side."""
    order = list(dict.fromkeys([*(classes or []), *(s.name for s in all_table.rows()),
                                *(s.name for s in sample_table.rows())]))
    rows = []
    for name in order:
        whole, part = all_table.get(name), sample_table.get(name)
        rows.append(ClassAgreement(name, whole, part, part.lo - 1e-12 <= whole.share <= part.hi + 1e-12))
    tv = (0.5 * sum(abs(c.all.share - c.sample.share) for c in rows)
          if all_table.n and sample_table.n else None)
    return Agreement(all_table.field, rows, tv, all_table.n, sample_table.n)
