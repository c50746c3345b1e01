"""The held-out examples a latent is scored on, and how their tokens read in a prompt.

The explainer sees the even-ranked top contexts, the scorers the odd-ranked ones
(`split_contexts`). Per latent (`plan_examples`, seeded by the latent, never by its description,
so a matched and a shuffled description see the same examples): activating windows drawn across
the activation quantiles of the held-out contexts (delphi's split: equal-count bins from the top
down, as many from each), and as many non-activating windows (the record's negatives where the
latent never fires: "same-token" and "random"; other latents' top windows with levels 0 where a
record has too few).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from autointerp.display import shown
from autointerp.interp.scorers.settings import ScoreSettings
from autointerp.schema import Context, FeatureRecord


@dataclass
class Window:
    """A slice of a context shown to the scorer: tokens, their levels, and what it is."""

    tokens: list[str]
    levels: list[int]
    activating: bool
    kind: str  # "quantile-<i>" (0 = top bin) | "same-token" | "random" | "other-latents"
    center: int  # index (in tokens) of the max token, or of the anchor token of a negative

    @property
    def peak(self) -> int:
        return max(self.levels, default=0)


@dataclass
class ExamplePlan:
    """One latent's held-out examples (the same for every description it is scored with)."""

    activating: list[Window]
    non_activating: list[Window]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.activating + self.non_activating:
            out[w.kind] = out.get(w.kind, 0) + 1
        return out


def split_contexts(record: FeatureRecord) -> tuple[list[Context], list[Context]]:
    """(explainer's contexts, scorers' held-out contexts): even-ranked vs odd-ranked."""
    return record.contexts[0::2], record.contexts[1::2]


def _fires(context: Context) -> bool:
    return any(v > 0 for v in context.levels)


def _peak(context: Context) -> float:
    values = context.activations if context.activations is not None else context.levels
    return max(values, default=0)


def quantile_sample(contexts: Sequence[Context], n: int, n_quantiles: int,
                    rng: random.Random) -> list[tuple[int, Context]]:
    """n activating contexts drawn across activation quantiles (delphi): sorted by peak
    activation, cut into n_quantiles equal-count bins from the top down, n // n_quantiles drawn
    at random from each (the remainder spread over the bins); a bin short of contexts leaves its
    share to the others. Returns (bin, context), bin 0 the top."""
    live = sorted((c for c in contexts if _fires(c)), key=_peak, reverse=True)
    if len(live) <= n:
        q = max(1, min(n_quantiles, len(live)))
        return [(i * q // max(len(live), 1), c) for i, c in enumerate(live)]
    q = min(n_quantiles, len(live))
    bins = [list(b) for b in np.array_split(np.arange(len(live)), q)]
    quota = [n // q + (1 if i < n % q else 0) for i in range(q)]
    chosen: list[tuple[int, int]] = []
    spare: list[tuple[int, int]] = []
    for b, (members, k) in enumerate(zip(bins, quota)):
        picked = rng.sample(members, min(k, len(members)))
        chosen += [(b, i) for i in picked]
        spare += [(b, i) for i in members if i not in picked]
    if len(chosen) < n:
        chosen += rng.sample(spare, n - len(chosen))
    return [(b, live[i]) for b, i in sorted(chosen, key=lambda x: x[1])]


def cut_window(context: Context, center: int, width: int, activating: bool, kind: str) -> Window:
    """The tokens within `width` of `center`."""
    center = min(max(center, 0), max(len(context.tokens) - 1, 0))
    lo, hi = max(0, center - width), min(len(context.tokens), center + width + 1)
    levels = list(context.levels[lo:hi]) if activating else [0] * (hi - lo)
    return Window(list(context.tokens[lo:hi]), levels, activating, kind, center - lo)


def top_token(record: FeatureRecord) -> str | None:
    """The token at the max of the latent's top context (what "same-token" negatives contain)."""
    for c in record.contexts:
        if c.max_index >= 0 and _fires(c):
            return c.tokens[c.max_index]
    return None


def plan_examples(record: FeatureRecord, settings: ScoreSettings,
                  pool: Sequence[FeatureRecord] = ()) -> ExamplePlan:
    """The latent's activating and non-activating windows, seeded by the latent only."""
    rng = random.Random(f"examples:{settings.seed}:{record.checkpoint_step}:{record.feature}")
    _, held_out = split_contexts(record)
    activating = [cut_window(c, c.max_index, settings.window, True, f"quantile-{b}")
                  for b, c in quantile_sample(held_out, settings.n_activating, settings.n_quantiles, rng)]
    kinds = list(record.extra.get("negative_kinds") or [])
    anchor = top_token(record)
    own = []
    for i, c in enumerate(record.negatives):
        if not c.tokens or _fires(c):  # "similar" negatives still fire: no non-activating example
            continue
        kind = kinds[i] if i < len(kinds) else "random"
        kind = kind if kind in ("same-token", "random") else "random"
        center = c.tokens.index(anchor) if kind == "same-token" and anchor in c.tokens else rng.randrange(len(c.tokens))
        own.append(cut_window(c, center, settings.window, False, kind))
    rng.shuffle(own)
    # hard negatives (the latent's own top token, silent) up to half, random contexts for the rest
    same = [w for w in own if w.kind == "same-token"][:settings.n_non_activating // 2]
    rest = [w for w in own if w.kind != "same-token" or w not in same]
    non_activating = same + [w for w in rest if w not in same][:settings.n_non_activating - len(same)]
    missing = settings.n_non_activating - len(non_activating)
    if missing > 0:  # other latents' top windows, assumed silent for this latent (an approximation)
        others = [o for o in pool if o.checkpoint_step == record.checkpoint_step and o.key != record.key
                  and o.contexts]
        for o in rng.sample(others, min(missing, len(others))):
            c = o.contexts[0]
            non_activating.append(cut_window(c, c.max_index, settings.window, False, "other-latents"))
    return ExamplePlan(activating, non_activating)


def shown_text(tokens: Sequence[str], marked: set[int] | frozenset = frozenset()) -> str:
    """Tokens as one line of text; runs of marked tokens between << and >> (delphi's format)."""
    parts, open_ = [], False
    for i, token in enumerate(tokens):
        text = shown(token, "prompt")
        if i in marked and not open_:
            parts.append("<<")
            open_ = True
        elif i not in marked and open_:
            parts.append(">>")
            open_ = False
        parts.append(text)
    if open_:
        parts.append(">>")
    return "".join(parts)
