"""The seeded sample of live latents that `label`, `score` and `annotate` share.

The paper labelled 100 features per checkpoint by hand; a run labels N per checkpoint with
`--features N`. Human and model labels only meet when both come from the same N, so every
command draws them here: from the latents that have contexts (live), in the order of the
records file, with random.Random(seed).sample, returned in feature order. Only the keys take
part, so a caller can draw the sample from a cheap scan of a large file (records.scan_keys)
and parse just the chosen records.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

from autointerp.schema import FeatureRecord

Key = tuple[int | None, int]  # (checkpoint_step, feature)
T = TypeVar("T")


def sample_keys(live: Sequence[Key], n: int, seed: int = 0) -> list[Key]:
    """n of the live keys, seeded, in feature order."""
    return _sample(list(live), n, seed, lambda k: k[1])


def sample_live(records: Sequence[FeatureRecord], n: int, seed: int = 0) -> list[FeatureRecord]:
    """A seeded random sample of n records that have contexts, in feature order (stable across
    reruns): the same latents as sample_keys over the live records' keys."""
    return _sample([r for r in records if r.contexts], n, seed, lambda r: r.feature)


def _sample(live: list[T], n: int, seed: int, feature) -> list[T]:
    if n < 0:
        raise ValueError(f"sample size must be >= 0, not {n}")
    # random.sample picks by position only: keys and records of the same file give the same latents
    return sorted(random.Random(seed).sample(live, min(n, len(live))), key=feature)


def parse_count(text: str) -> int | None:
    """--features N|all: a positive count, or None for all."""
    if text.strip().lower() == "all":
        return None
    value = int(text)  # ValueError for anything else
    if value < 1:
        raise ValueError(f"{value} is not a positive count")
    return value
