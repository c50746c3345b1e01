"""The seeded samples of live latents that `label`, `score` and `annotate` share.

`label` draws its LLM sample stratified by the statistical granularity class
(`sample_stratified`): every class present gets at least one latent, the rest are shared in
proportion to the classes' sizes, each class drawn with its own seeded generator. The latents
it drew are marked `sampled` in labels.jsonl; `labelled_sample` reads them back, so annotate
and score meet label on the same latents. Where no labels exist yet, the plain seeded sample
below is drawn.

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

from autointerp.schema import FeatureRecord, Key, row_key

T = TypeVar("T")


def sample_keys(live: Sequence[Key], n: int, seed: int = 0) -> list[Key]:
    """n of the live keys, seeded, in feature order."""
    return _sample(list(live), n, seed, lambda k: k.feature)


def sample_live(records: Sequence[FeatureRecord], n: int, seed: int = 0) -> list[FeatureRecord]:
    """A seeded random sample of n records that have contexts, in feature order (stable across
    reruns): the same latents as sample_keys over the live records' keys."""
    return _sample([r for r in records if r.contexts], n, seed, lambda r: r.feature)


def _sample(live: list[T], n: int, seed: int, feature) -> list[T]:
    if n < 0:
        raise ValueError(f"sample size must be >= 0, not {n}")
    # random.sample picks by position only: keys and records of the same file give the same latents
    return sorted(random.Random(seed).sample(live, min(n, len(live))), key=feature)


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of n go to each class: one to every non-empty class, the rest by largest
    remainder in proportion to the class sizes, never more than a class holds. The sample is at
    least one per class, so it can exceed n when n < the number of classes."""
    present = {c: k for c, k in sizes.items() if k > 0}
    total = sum(present.values())
    n = min(max(n, len(present)), total)
    take = {c: 1 for c in present}
    left = n - len(take)
    if left > 0:
        room = {c: present[c] - 1 for c in present}
        quotas = {c: left * room[c] / max(sum(room.values()), 1) for c in present}
        for c in present:
            take[c] += min(int(quotas[c]), room[c])
        order = sorted(present, key=lambda c: (-(quotas[c] - int(quotas[c])), c))
        while sum(take.values()) < n:  # remainders first, then any class with room left
            grew = False
            for c in order:
                if sum(take.values()) < n and take[c] < present[c]:
                    take[c] += 1
                    grew = True
            if not grew:
                break
    return take


def sample_stratified(classes: dict[Key, str], n: int | None, seed: int = 0) -> tuple[list[Key], dict[str, int]]:
    """(sampled keys in file order of the features, per-class counts): n live latents by their
    class (key -> class), seeded; None = all of them."""
    by_class: dict[str, list[Key]] = {}
    for key, cls in classes.items():
        by_class.setdefault(cls, []).append(key)
    if n is None:
        return sorted(classes, key=Key.sort_key), {c: len(v) for c, v in sorted(by_class.items())}
    take = allocate({c: len(v) for c, v in by_class.items()}, n)
    chosen: list[Key] = []
    for cls in sorted(take):
        keys = sorted(by_class[cls], key=Key.sort_key)
        chosen += random.Random(f"{seed}:{cls}").sample(keys, take[cls])
    return sorted(chosen, key=Key.sort_key), dict(sorted(take.items()))


def labelled_sample(labels_path) -> list[Key]:
    """The latents a labels.jsonl marks `sampled` (label's LLM sample), in file order; [] when
    the file is missing or marks none."""
    import json
    from pathlib import Path

    path = Path(labels_path)
    if not path.is_file():
        return []
    keys = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if '"sampled": true' not in line:  # cheap: most lines are not in the sample
                continue
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("sampled"):
                keys.append(row_key(d))
    return keys


def parse_count(text: str) -> int | None:
    """--features N|all: a positive count, or None for all."""
    if text.strip().lower() == "all":
        return None
    value = int(text)  # ValueError for anything else
    if value < 1:
        raise ValueError(f"{value} is not a positive count")
    return value
