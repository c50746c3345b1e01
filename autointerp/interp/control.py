"""The shuffled-description control: whether a run's scores carry any signal.

`run_control` scores a seeded sample of latents again, each with another sampled latent's
description (a seeded derangement), on the same examples as the matched scores, and says per
method whether the matched descriptions beat the shuffled ones: the paired gap (matched -
shuffled) with a bootstrap 95% interval over latents, and a verdict of signal only when an exact
sign-flip test of the gap, Holm-corrected for the number of methods tested, rejects at 5%
(SIGNAL_ALPHA) on at least MIN_CONTROL_PAIRS latents. Several methods on a handful of latents give
one interval clear of 0 by chance far more often than 5% (evals/control_null.py measures it), so
the verdict is familywise. The shuffled scores stream to their own file (never the matched
scores'), one line per latent, so a stopped control resumes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from autointerp.interp.score import score_records
from autointerp.interp.scorers.metrics import bootstrap_ci, holm, sign_flip_p
from autointerp.interp.scorers.settings import METHODS, ScoreSettings
from autointerp.schema import FeatureRecord, Key, Scores

MIN_CONTROL_PAIRS = 10  # latents scored both ways before the control may call a method informative
SIGNAL_ALPHA = 0.05  # familywise: the chance that any method is called signal when none carries any


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random permutation with no fixed point (perm[i] != i for every i); n >= 2."""
    if n < 2:
        raise ValueError(f"no derangement of {n} item(s)")
    while True:  # rejection: about e tries on average
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def shuffled_assignment(texts: Sequence[str], rng: random.Random, tries: int = 200) -> list[int]:
    """A derangement that also avoids handing a latent a description equal to its own text where
    possible (two latents with the same description would make a shuffle that changes nothing);
    the derangement with the fewest equal texts among `tries`."""
    best, best_equal = None, None
    for _ in range(tries):
        perm = derangement(len(texts), rng)
        equal = sum(texts[p] == texts[i] for i, p in enumerate(perm))
        if best_equal is None or equal < best_equal:
            best, best_equal = perm, equal
        if equal == 0:
            break
    return best


@dataclass
class ControlResult:
    """Matched vs shuffled descriptions on the same latents and examples, per method."""

    methods: dict[str, dict[str, Any]]  # method -> metric, n, matched, shuffled, gap, ci95, verdict, signal
    n_latents: int
    model: str = ""
    seed: int = 0
    fraction: float = 0.2
    sample: list[list[int | None]] = field(default_factory=list)  # [checkpoint_step, feature] scored shuffled

    @property
    def vouched(self) -> list[str]:
        """The methods whose scores the control vouches for (signal): only these are shown as
        information and enter the granularity decision."""
        return [name for name, m in self.methods.items() if m.get("signal")]

    @property
    def noise(self) -> bool:
        """True when the control vouches for no method: the scores carry no signal."""
        return not self.vouched

    @property
    def verdict(self) -> str:
        if not self.methods:
            return "no control: no scored latents with a description"
        if self.noise:
            best = max(self.methods, key=lambda k: self.methods[k]["gap"] if self.methods[k].get("gap") is not None
                       else -9)
            m = self.methods[best]
            detail = (f"best: {best} gap {_num(m['gap'])}, 95% CI {_num(m['ci95'][0])}–{_num(m['ci95'][1])}; "
                      if m.get("gap") is not None else "")
            return (f"scores from {self.model or 'this model'} do not beat shuffled descriptions ({detail}"
                    f"{self.n_latents} latents): treat them as noise")
        return "; ".join(m["verdict"] for m in self.methods.values())

    def to_dict(self) -> dict[str, Any]:
        return {"methods": self.methods, "n_latents": self.n_latents, "model": self.model, "seed": self.seed,
                "fraction": self.fraction, "noise": self.noise, "vouched": self.vouched, "verdict": self.verdict,
                "rule": signal_rule(len(self.methods)), "min_latents": MIN_CONTROL_PAIRS, "sample": self.sample}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlResult":
        return cls(methods=d.get("methods") or {}, n_latents=int(d.get("n_latents") or 0), model=d.get("model", ""),
                   seed=int(d.get("seed") or 0), fraction=float(d.get("fraction") or 0.2),
                   sample=d.get("sample") or [])


def _num(x: float) -> str:
    return f"{x:.2f}".replace("-", "−")


def _p(x: float) -> str:
    return "< 0.001" if x < 0.001 else f"{x:.3f}"


def control_sample(records: Sequence[FeatureRecord], descriptions: dict[Key, str], scored: set[Key],
                   fraction: float, minimum: int, seed: int) -> list[FeatureRecord]:
    """A seeded sample of the latents that have a description and a matched score: `fraction` of
    them, at least `minimum`, all if fewer; in records' order."""
    candidates = [r for r in records if (descriptions.get(r.key) or "").strip() and r.key in scored]
    k = min(len(candidates), max(minimum, math.ceil(fraction * len(candidates))))
    chosen = set(r.key for r in random.Random(f"control:{seed}").sample(candidates, k))
    return [r for r in candidates if r.key in chosen]


def control_value(s: Scores, method: str, metric: str) -> float | None:
    if metric == "auc":
        return (s.auc or {}).get(method)
    return getattr(s, method)


def signal_rule(n_methods: int) -> str:
    """The verdict rule in words, for the manifest, the CLI and the report."""
    return (f"signal: the gap's exact sign-flip p-value, Holm-corrected over the {n_methods} method(s) tested, "
            f"below {SIGNAL_ALPHA:g} (one-sided), on at least {MIN_CONTROL_PAIRS} latents")


def compare_control(matched: dict[Key, Scores], shuffled: dict[Key, Scores], methods: Sequence[str],
                    model: str, seed: int, n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """Per method: mean matched, mean shuffled, gap and its paired bootstrap 95% interval over
    latents, the sign-flip p-value and its Holm adjustment over the methods, a verdict in words.
    detection/fuzzing compare AUC where every latent has one on both sides, else balanced
    accuracy; simulation compares the correlation."""
    out: dict[str, dict[str, Any]] = {}
    gaps_by_method: dict[str, list[float]] = {}
    keys = [k for k in shuffled if k in matched]
    for method in methods:
        metric = "pearson" if method == "simulation" else "balanced accuracy"
        if method != "simulation" and keys and all(control_value(matched[k], method, "auc") is not None
                                                   and control_value(shuffled[k], method, "auc") is not None
                                                   for k in keys):
            metric = "auc"
        pairs = [(control_value(matched[k], method, metric), control_value(shuffled[k], method, metric)) for k in keys]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        entry: dict[str, Any] = {"metric": metric, "n": len(pairs)}
        if len(pairs) < 2:
            entry |= {"matched": None, "shuffled": None, "gap": None, "ci95": None, "p": None, "p_holm": None,
                      "signal": False,
                      "verdict": f"{method}: too few latents scored both ways ({len(pairs)}) to compare"}
            out[method] = entry
            continue
        a = np.array([p[0] for p in pairs])
        b = np.array([p[1] for p in pairs])
        gaps = list(a - b)
        gaps_by_method[method] = gaps
        ci = bootstrap_ci([gaps], lambda g: float(np.mean(g)), n_boot, f"control:{seed}:{method}")
        entry |= {"matched": round(float(a.mean()), 4), "shuffled": round(float(b.mean()), 4),
                  "gap": round(float(np.mean(gaps)), 4), "ci95": ci,
                  "p": round(sign_flip_p(gaps, f"control:{seed}:{method}"), 5)}
        out[method] = entry
    adjusted = holm({m: out[m]["p"] for m in gaps_by_method})
    tested = len(gaps_by_method)
    for method in gaps_by_method:
        entry = out[method]
        entry["p_holm"] = round(adjusted[method], 5)
        n, ci = entry["n"], entry["ci95"]
        signal = n >= MIN_CONTROL_PAIRS and adjusted[method] < SIGNAL_ALPHA
        test = f"sign-flip p {_p(entry['p'])}" + (f", Holm over {tested} methods {_p(entry['p_holm'])}"
                                                  if tested > 1 else "")
        span = f"gap {_num(entry['gap'])}, 95% CI {_num(ci[0])}–{_num(ci[1])}; {test}"
        if n < MIN_CONTROL_PAIRS:
            verdict = (f"{method}: {n} latents are too few for a verdict ({span}; at least "
                       f"{MIN_CONTROL_PAIRS} needed): treat it as noise")
        elif signal:
            verdict = f"{method} discriminates ({span})"
        elif ci[1] < 0:
            verdict = (f"{method} from {model} scores shuffled descriptions higher than matched ones ({span}): "
                       "treat it as noise")
        elif ci[0] > 0:
            verdict = (f"{method} from {model}: the gap's interval lies above 0, but the test corrected for "
                       f"the {tested} methods tested does not reject ({span}): treat it as noise")
        else:
            verdict = f"{method} from {model} does not beat shuffled descriptions ({span}): treat it as noise"
        entry |= {"signal": bool(signal), "verdict": verdict}
    return out


def control_plan(records: Sequence[FeatureRecord], descriptions: dict[Key, str], scores: Sequence[Scores],
                 fraction: float = 0.2, minimum: int = 10, seed: int = 0
                 ) -> tuple[list[FeatureRecord], dict[Key, str], dict[Key, Key]]:
    """(sample, shuffled descriptions, where each came from): the control's seeded sample of the
    latents with a description and a matched score, and a seeded derangement of their descriptions
    (avoiding equal texts where possible). Empty descriptions when fewer than 2 latents."""
    scored = {s.key for s in scores if any(getattr(s, m) is not None for m in METHODS)}
    sample = control_sample(records, descriptions, scored, fraction, minimum, seed)
    if len(sample) < 2:
        return sample, {}, {}
    texts = [descriptions[r.key].strip() for r in sample]
    perm = shuffled_assignment(texts, random.Random(f"derangement:{seed}"))
    shuffled = {r.key: descriptions[sample[p].key] for r, p in zip(sample, perm)}
    origin = {r.key: sample[p].key for r, p in zip(sample, perm)}
    return sample, shuffled, origin


def run_control(records: Sequence[FeatureRecord], descriptions: dict[Key, str], scores: Sequence[Scores],
                client, out_path: str | Path | None, settings: ScoreSettings | None = None,
                fraction: float = 0.2, minimum: int = 10, seed: int = 0,
                on_done: Callable[[Scores], None] | None = None) -> ControlResult:
    """Score a seeded sample of the latents again, each with another sampled latent's description
    (a seeded derangement; where two latents share a description text the shuffle avoids handing
    it back), with the same examples as the matched scores; the shuffled scores go to out_path
    (never the matched scores' file) and are resumable. Returns the comparison per method."""
    settings = settings or ScoreSettings()
    matched = {s.key: s for s in scores if any(getattr(s, m) is not None for m in METHODS)}
    sample, shuffled, origin = control_plan(records, descriptions, scores, fraction, minimum, seed)
    model = next((s.simulator.get("model") for s in matched.values() if (s.simulator or {}).get("model")),
                 getattr(client, "model", "") or "")
    base = ControlResult(methods={}, n_latents=len(sample), model=model, seed=seed, fraction=fraction,
                         sample=[list(r.key) for r in sample])
    if len(sample) < 2:
        base.methods = {m: {"metric": None, "n": len(sample), "matched": None, "shuffled": None, "gap": None,
                            "ci95": None, "signal": False,
                            "verdict": f"{m}: too few scored latents ({len(sample)}) for a control"}
                        for m in settings.methods}
        return base
    control_scores = score_records(sample, shuffled, client, out_path, settings, on_done, pool=records, origin=origin)
    base.methods = compare_control(matched, {s.key: s for s in control_scores}, settings.methods, model, seed)
    return base


def print_control(control: ControlResult, console: Console) -> None:
    """The control's verdict per method, as the CLI and label print it."""
    console.print(f"control: {control.n_latents} latents scored again with another latent's description "
                  f"(seed {control.seed})")
    for method, m in control.methods.items():
        if m.get("gap") is None:
            console.print(f"  {m['verdict']}")
            continue
        style = "green" if m["signal"] else "yellow"
        console.print(f"  [{style}]{m['verdict']}[/]  [dim]{m['metric']}: matched {m['matched']:.3f}, "
                      f"shuffled {m['shuffled']:.3f}, n {m['n']}[/]", highlight=False)
    style = "bold yellow" if control.noise else "bold green"
    console.print(f"[{style}]verdict: {control.verdict}[/]", highlight=False)
    console.print(f"  [dim]{signal_rule(len(control.methods))}[/]", highlight=False)
