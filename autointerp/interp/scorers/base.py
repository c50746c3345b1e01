"""The scorer interface (after delphi's `Scorer`): a method's name, the prompt templates it
renders, and one async call that scores one latent's description on its held-out examples."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from autointerp.interp.scorers.examples import ExamplePlan
from autointerp.interp.scorers.settings import ScoreSettings


@dataclass
class MethodResult:
    """One method's score of one latent: the value (None when there is none), what it was
    computed from (kept in the scores line), its bootstrap 95% interval, the AUC where the method
    has one, and what went wrong (a partial or missing score)."""

    value: float | None
    info: dict[str, Any] = field(default_factory=dict)
    ci95: list[float] | None = None
    auc: float | None = None
    error: str | None = None


class Scorer(ABC):
    """A scoring method: `name` is its name in `ScoreSettings.methods` and in the scores line,
    `templates` the prompt templates it may render (their hashes go into the run's manifest)."""

    name: str
    templates: tuple[str, ...]

    @abstractmethod
    async def score(self, client, description: str, plan: ExamplePlan, settings: ScoreSettings,
                    rng: random.Random) -> MethodResult:
        """The description's score on the latent's examples; rng is seeded by method and latent."""

    def one_at_a_time(self, settings: ScoreSettings) -> bool:
        """Whether latents go to the server one after another, not all at once (a scorer whose
        requests reuse the server's prompt cache from one to the next)."""
        return False
