"""How often the shuffled-description control calls a score "signal" when no score carries any.

Under the null the matched and the shuffled score of a latent are exchangeable, so each latent's
gap (matched - shuffled) is as likely to be +g as -g. This draws many such nulls of the control's
size (default 10 latents, 3 methods, as `label` runs it on a 100-latent sample) and counts the
runs in which at least one method is called signal, by two rules:

- interval: a method's percentile-bootstrap 95% interval of the mean gap lies above 0 (the rule
  before the familywise correction);
- familywise: the exact sign-flip p-value, Holm-corrected over the methods, below 0.05 (the rule
  interp/control.py applies).

Gaps are drawn three ways: Gaussian with the methods independent, Gaussian with correlation 0.5
between methods (one latent's scorers share its examples), and Student-t with 3 degrees of freedom
(heavy tails). With --run, also from a finished run's own control: each latent's real gaps with
random signs (the methods' correlation and the gaps' spread kept as they were).

    .venv/bin/python evals/control_null.py [--latents 10] [--trials 2000] [--run runs/demo-real]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from autointerp.interp.control import MIN_CONTROL_PAIRS, SIGNAL_ALPHA, control_value
from autointerp.interp.scorers.metrics import holm, sign_flip_p
from autointerp.jsonl import iter_jsonl
from autointerp.run import sites, site_dir
from autointerp.schema import Scores


def interval_rule(gaps: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> bool:
    """Any method's percentile-bootstrap 95% lower bound above 0; gaps [latents, methods]."""
    n = gaps.shape[0]
    idx = rng.integers(0, n, size=(n_boot, n))
    means = gaps[idx].mean(axis=1)  # [n_boot, methods]
    return bool((np.percentile(means, 2.5, axis=0) > 0).any())


def familywise_rule(gaps: np.ndarray) -> bool:
    """The control's rule: Holm-corrected sign-flip p below SIGNAL_ALPHA for any method."""
    if gaps.shape[0] < MIN_CONTROL_PAIRS:
        return False
    p = {str(j): sign_flip_p(gaps[:, j]) for j in range(gaps.shape[1])}
    return any(v < SIGNAL_ALPHA for v in holm(p).values())


def null_draws(kind: str, n: int, methods: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian, independent":
        return rng.standard_normal((n, methods))
    if kind == "gaussian, correlation 0.5":
        cov = np.full((methods, methods), 0.5) + 0.5 * np.eye(methods)
        return rng.multivariate_normal(np.zeros(methods), cov, size=n)
    if kind == "student-t, 3 df":
        return rng.standard_t(3, size=(n, methods))
    raise ValueError(kind)


def run_gaps(run: Path) -> np.ndarray:
    """[latents, methods] gaps of a finished run's control, on the metric the control compared."""
    manifest = json.loads((run / "manifest.json").read_text())
    control = (manifest.get("stages", {}).get("label") or {}).get("control") or {}
    methods = {m: d["metric"] for m, d in (control.get("methods") or {}).items() if d.get("metric")}
    shuffled = {s.key: s for s in iter_jsonl(run / "control.jsonl", Scores.from_dict)}
    matched = {s.key: s for site in sites(run) if (site_dir(run, site) / "scores.jsonl").exists()
               for s in iter_jsonl(site_dir(run, site) / "scores.jsonl", Scores.from_dict)}
    rows = []
    for key, s in shuffled.items():
        if key not in matched:
            continue
        row = [(control_value(matched[key], m, metric), control_value(s, m, metric)) for m, metric in methods.items()]
        if all(a is not None and b is not None for a, b in row):
            rows.append([a - b for a, b in row])
    if not rows:
        sys.exit(f"{run}: no latent scored both ways (control.jsonl and SITE/scores.jsonl)")
    return np.asarray(rows, dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latents", type=int, default=10)
    ap.add_argument("--methods", type=int, default=3)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", type=Path, help="also sign-flip the real gaps of this run's control")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    kinds = ["gaussian, independent", "gaussian, correlation 0.5", "student-t, 3 df"]
    rows = []
    for kind in kinds:
        draws = [null_draws(kind, args.latents, args.methods, rng) for _ in range(args.trials)]
        rows.append((kind, np.mean([interval_rule(g, rng) for g in draws]), np.mean([familywise_rule(g) for g in draws])))
    if args.run is not None:
        real = run_gaps(args.run)
        draws = [real * rng.choice((-1.0, 1.0), size=(real.shape[0], 1)) for _ in range(args.trials)]
        rows.append((f"{args.run}'s own gaps, signs flipped", np.mean([interval_rule(g, rng) for g in draws]),
                     np.mean([familywise_rule(g) for g in draws])))
        observed = {"interval": interval_rule(real, rng), "familywise": familywise_rule(real)}
    print(f"null: {args.latents} latents scored both ways, {args.methods} methods, {args.trials} trials each")
    print(f"share of null runs with at least one method called signal (the target is {SIGNAL_ALPHA:g}):")
    print(f"{'gaps drawn':<48} {'95% interval rule':>18} {'familywise rule':>16}")
    for kind, a, b in rows:
        se_a, se_b = (np.sqrt(x * (1 - x) / args.trials) for x in (a, b))
        print(f"{kind:<48} {a:>11.3f} ± {se_a:.3f} {b:>9.3f} ± {se_b:.3f}")
    if args.run is not None:
        print(f"{args.run} itself ({real.shape[0]} latents): interval rule says "
              f"{'signal' if observed['interval'] else 'noise'}, familywise rule says "
              f"{'signal' if observed['familywise'] else 'noise'}")


if __name__ == "__main__":
    main()
