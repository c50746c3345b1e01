"""Granularity and language agreement with the human labels of the dev file (`make eval`).

Nested grouped cross-validation, so the number cannot flatter: outer 5-fold split by feature id
(no feature, at any checkpoint, is scored by a model fitted or tuned on it), repeated over 10
seeds; inside each outer fold every choice — evidence groups, regularisation C, class weights,
class-share offsets, temperature — is made by autointerp.labels.fit.select with inner
grouped CV on the outer-training part only. Prints mean ± sd over seeds of kappa (4-way, 3-way),
per-class precision / recall and the worst per-checkpoint share gap, the per-checkpoint shares,
the ablation (each evidence piece forced in / out, everything else still chosen inside the
folds), and the language-trend agreement.

LLM evidence (the explainer's vote) joins as one more candidate group when cached explanations
of >= 90% of the dev features exist in runs/dev-eval/step-N/explanations.jsonl (`--explain`
makes them with the embedded SmolLM2 server). `--save` runs the same selection on all dev
features and writes the shipped model autointerp/data/granularity_model.json, with the nested-CV
numbers printed here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # many tiny fits: BLAS threads only contend
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from autointerp.labels import decision as G  # noqa: E402
from autointerp.labels import dictionary as D  # noqa: E402
from autointerp.labels import evidence as E  # noqa: E402
from autointerp.labels import fit as F  # noqa: E402
from autointerp.labels import language  # noqa: E402
from autointerp.labels import lm_evidence as LM  # noqa: E402
from autointerp.jsonl import iter_jsonl  # noqa: E402
from autointerp.records.read import read_records  # noqa: E402
from autointerp.schema import GRANULARITIES, Explanation, FeatureRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
EVAL_RUN = REPO / "runs/dev-eval"
MODEL_VERSION = "2026.12-dev300-v3-link-gate"
SHORT = {"token": "Tok", "concept-synonym": "Syn", "concept-semantic": "Sem", "uninterpretable": "Unint"}
TARGETS = {"kappa4": (">=", 0.82), "kappa3": (">=", 0.85), "recall_concept-synonym": (">=", 0.70),
           "worst_share_gap": ("<=", 5.0)}
OPTIONAL = [g for g in E.EVIDENCE_GROUPS if g != "core"]
LM_GROUPS = list(LM.LM_GROUPS)


def explanations_path(step: int | None) -> Path:
    return EVAL_RUN / f"step-{step}" / "explanations.jsonl"


def load_explanations(records: list[FeatureRecord]) -> dict | None:
    """Cached explanations when they cover >= 90% of the records, else None."""
    out = {}
    for step in sorted({r.checkpoint_step for r in records}):
        path = explanations_path(step)
        if path.exists():
            out.update({e.key: e for e in iter_jsonl(path, Explanation.from_dict, on_error="skip")})
    have = sum(out[r.key].granularity is not None for r in records if r.key in out)
    return out if have >= 0.9 * len(records) else None


def make_explanations(records: list[FeatureRecord], threads: int | None) -> None:
    from autointerp.interp.explainer import ExplainSettings, explain_records
    from autointerp.llm.client import LLMClient
    from autointerp.llm.serve import start_server

    with start_server("llama-cpp", None, n_threads=threads) as server:
        client = LLMClient(server.base_url, server.model, cache_path=EVAL_RUN / "cache.sqlite",
                           check_alive=server.check)
        for step in sorted({r.checkpoint_step for r in records}):
            recs = [r for r in records if r.checkpoint_step == step]
            explain_records(recs, client, explanations_path(step), ExplainSettings(engine="llama-cpp"))
        client.close()


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def verdict(name: str, mean: float) -> str:
    op, value = TARGETS[name]
    met = mean >= value if op == ">=" else mean <= value
    return f"target {op} {value:g}: {'MET' if met else 'NOT MET'}"


def print_summary(summary: dict, result: F.NestedResult, n_seeds: int) -> None:
    print(f"\nnested CV, mean ± sd over {n_seeds} seeds (each seed: out-of-fold predictions of all features)")
    rows = [("kappa 4-way", "kappa4", 3), ("kappa 3-way (token / concept / uninterp.)", "kappa3", 3),
            ("concept-synonym recall", "recall_concept-synonym", 3),
            ("worst per-checkpoint share gap (points)", "worst_share_gap", 1)]
    for label, key, digits in rows:
        print(f"  {label:<42} {fmt(summary[key], digits):<16} {verdict(key, summary[key][0])}")
    print("  per class precision / recall:")
    for g in GRANULARITIES:
        print(f"    {g:<18} {fmt(summary[f'precision_{g}'], 2)} / {fmt(summary[f'recall_{g}'], 2)}")
    choices = [c for per_seed in result.choices for c in per_seed]
    groups = Counter("+".join(c.groups) for c in choices)
    print(f"  chosen inside the {len(choices)} outer folds: evidence " +
          ", ".join(f"{k} ({v})" for k, v in groups.most_common()))
    print("    C " + ", ".join(f"{k} ({v})" for k, v in sorted(Counter(c.C for c in choices).items())) +
          "; class weights " + ", ".join(f"{k} ({v})" for k, v in Counter(c.class_weight for c in choices).most_common()))


def print_shares(y, steps, result: F.NestedResult) -> None:
    print("\nper checkpoint, class shares in % (Tok / Syn / Sem / Unint); autointerp = out-of-fold, mean over seeds")
    print(f"{'step':>7} {'n':>4} | {'human':<16} | {'autointerp':<22} | worst gap (mean ± sd over seeds)")
    for step in sorted(set(steps)):
        idx = [i for i, s in enumerate(steps) if s == step]
        human = [100.0 * sum(y[i] == c for i in idx) / len(idx) for c in GRANULARITIES]
        auto = np.mean([[100.0 * sum(p[i] == c for i in idx) / len(idx) for c in GRANULARITIES]
                        for p in result.predictions], axis=0)
        gaps = [F.share_gaps(y, p, steps)[step].max() for p in result.predictions]
        print(f"{step:>7} {len(idx):>4} | {'/'.join(f'{v:.0f}' for v in human):<16} | "
              f"{'/'.join(f'{v:.1f}' for v in auto):<22} | {np.mean(gaps):.1f} ± {np.std(gaps):.1f}")


def lm_beside_shipped(X, y, gid, names, steps, pool, lm_candidates, seeds, jobs, gate: bool = False) -> list:
    """The LM evidence groups beside the shipped configuration, in the same run: nested CV with the
    kept statistical pieces as candidates (what is shipped) vs the same plus each LM group (and all
    of them), every choice (groups, C, class weights, temperature) made inside the outer folds.
    A group clears the bar where the mean kappa4 gain is larger than the larger of the two sds."""
    base_pool = [g for g in pool if g not in LM_GROUPS]
    shipped_result = F.nested_cv(X, y, gid, names, base_pool, seeds=seeds, jobs=jobs, gate=gate)
    shipped = F.summarise(shipped_result, y, steps)
    rows = [("shipped pieces", shipped, shipped, False)]
    options = [[g] for g in lm_candidates] + ([list(lm_candidates)] if len(lm_candidates) > 1 else [])
    for extra in options:
        res = F.summarise(F.nested_cv(X, y, gid, names, base_pool + extra, seeds=seeds, jobs=jobs, gate=gate), y, steps)
        gain = res["kappa4"][0] - shipped["kappa4"][0]
        rows.append(("+" + "+".join(extra), res, shipped, gain > max(res["kappa4"][1], shipped["kappa4"][1])))
    return rows, shipped_result


def print_lm_rows(rows, base_pool) -> None:
    print(f"\nLM evidence beside the shipped configuration (candidates: {', '.join(base_pool) or 'none'}; "
          "nested CV, mean ± sd over seeds,\nevery choice inside the outer folds; clears the bar where the kappa4 "
          "gain is > 1 sd)")
    print(f"  {'candidates':<44} {'kappa4':<16} {'gain':>7} {'bar':<4} {'kappa3':<16} {'syn recall':<13} "
          f"{'syn precision':<13} worst share gap")
    for name, res, shipped, kept in rows:
        gain = res["kappa4"][0] - shipped["kappa4"][0]
        bar = "-" if name == "shipped pieces" else ("yes" if kept else "no")
        print(f"  {name:<44} {fmt(res['kappa4']):<16} {gain:+7.3f} {bar:<4} {fmt(res['kappa3']):<16} "
              f"{fmt(res['recall_concept-synonym'], 2):<13} {fmt(res['precision_concept-synonym'], 2):<13} "
              f"{fmt(res['worst_share_gap'], 1)}")


def ablation(X, y, gid, names, steps, candidates, seeds, jobs) -> tuple[list, dict]:
    """Each piece with (core + it) vs without (core alone), C and class weights still chosen inside
    the folds; kept where it raises the nested-CV mean kappa by more than one sd. Plus the
    class-share offsets on vs off (with all pieces)."""
    def run(groups, **kw):
        res = F.nested_cv(X, y, gid, names, groups, seeds=seeds, jobs=jobs, select_groups=False, **kw)
        return F.summarise(res, y, steps)

    core = run([])
    rows = []
    for g in candidates:
        with_ = run([g])
        gain = with_["kappa4"][0] - core["kappa4"][0]
        rows.append((g, with_, core, gain > max(with_["kappa4"][1], core["kappa4"][1])))
    plain, offsets = run(candidates), run(candidates, calibrate_shares=True)
    rows.append(("share offsets", offsets, plain, False))
    return rows, core


def print_ablation(rows, majority: tuple[float, float]) -> None:
    print("\nablation: nested CV, mean ± sd over seeds; a piece 'with' = core + it, 'without' = core alone;\n"
          "C and class weights still chosen inside the folds; kept where the gain is > 1 sd")
    print(f"  {'piece':<20} {'kappa4 with':<16} {'without':<16} {'gain':>7}  {'kept':<5} "
          f"{'kappa3 with':<16} {'syn recall with':<16} {'syn prec. with':<16} share gap with / without")
    for name, with_, without, kept in rows:
        gain = with_["kappa4"][0] - without["kappa4"][0]
        shown = "yes" if kept else ("-" if name == "share offsets" else "no")
        print(f"  {name:<20} {fmt(with_['kappa4']):<16} {fmt(without['kappa4']):<16} {gain:+7.3f}  {shown:<5} "
              f"{fmt(with_['kappa3']):<16} {fmt(with_['recall_concept-synonym'], 2):<16} "
              f"{fmt(with_['precision_concept-synonym'], 2):<16} "
              f"{with_['worst_share_gap'][0]:.1f} / {without['worst_share_gap'][0]:.1f}")
    print("  (share offsets: 'with' = all pieces + offsets matching the training class shares, 'without' = "
          "all pieces, no offsets)")
    print(f"  {'majority class':<20} {majority[0]:.3f}")


def language_report(records) -> None:
    profiles = [language.profile(r) for r in records]
    human = [r.extra.get("language_trend") for r in records]
    paper = [p["trend"] for p in profiles]
    ld = [p["trend_langdetect"] if p["trend_langdetect"] in ("en", "ja") else "mix" for p in profiles]
    print("\nlanguage trend vs the human file's language_trend:")
    print(f"  paper rule (max token ASCII without digits -> en, else ja): "
          f"{sum(a == b for a, b in zip(paper, human))}/{len(records)} agree")
    print(f"  langdetect over context text:                              "
          f"{sum(a == b for a, b in zip(ld, human))}/{len(records)} agree")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev", type=Path, default=DEV, help="human-labelled dev file")
    ap.add_argument("--seeds", type=int, default=10, help="outer repetitions (default 10)")
    ap.add_argument("--jobs", type=int, default=2, help="processes (seeds run in parallel)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the ablation (~7x the nested CV's time)")
    ap.add_argument("--explain", action="store_true", help="make missing dev explanations with the embedded "
                                                           "SmolLM2 server (cached)")
    ap.add_argument("--stats-only", action="store_true", help="ignore cached explanations")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads for --explain")
    ap.add_argument("--no-lm", action="store_true", help="leave out the LM evidence groups (lm_*) even where "
                                                         "the `gemma` extra is installed")
    ap.add_argument("--lm", default=LM.DEFAULT_LM, help="the LM of the lm_* evidence (default gemma-3-270m)")
    ap.add_argument("--ablation-groups", default=None,
                    help="comma list: ablation rows only for these pieces (default: every candidate)")
    ap.add_argument("--no-gate", action="store_true",
                    help="without the synonym gate (concept-synonym only where another word of the top word's "
                         "meaning is the max token of >= 2 contexts and the words of that meaning cover >= half the "
                         "firing contexts); both are printed, this picks THE NUMBER and --save")
    ap.add_argument("--save", action="store_true", help="select + fit on all dev features and write the shipped model")
    args = ap.parse_args()
    if not args.dev.exists():
        print(f"dev file {args.dev} not found (it lives in ../shared/data/); nothing to evaluate", file=sys.stderr)
        return 1
    records = read_records(args.dev)
    if args.explain:
        make_explanations(records, args.threads)
    explanations = None if args.stats_only else load_explanations(records)
    y = [r.extra["human_granularity"] for r in records]
    gid = [r.feature for r in records]  # groups the folds; never a feature
    steps = [r.checkpoint_step for r in records]  # splits the share table; never a feature
    if len(set(gid)) < 10:
        print(f"only {len(set(gid))} distinct feature ids: too few for nested grouped CV")
        return 1
    print(f"dev file {args.dev.name}: {len(records)} features, {len(set(gid))} feature ids, "
          f"{len(set(steps))} checkpoints")
    print(D.describe_sources())
    started = time.perf_counter()
    evidence = [E.feature_vector(r, explanations.get(r.key) if explanations else None).features for r in records]
    print(f"evidence: {len(records) / (time.perf_counter() - started):.0f} features/s (first pass, cold caches)")
    use_lm = not args.no_lm and LM.lm_available(args.lm)
    if use_lm:
        started = time.perf_counter()
        scorer = LM.LMEvidence(args.lm)
        for features, lm in zip(evidence, scorer.features(records)):
            features.update(lm)
        print(f"LM evidence ({args.lm}, hidden states of its middle layer): {scorer.computed} sequences run, the rest "
              f"from the cache; {time.perf_counter() - started:.1f} s for {len(records)} features")
    else:
        print("LM evidence: " + ("off (--no-lm)" if args.no_lm else
                                 f"{args.lm} not installed (pip install 'autointerp[gemma]'); lm_* groups left out"))
    groups = list(E.EVIDENCE_GROUPS) + (["llm"] if explanations else [])
    X, names = F.design(evidence, groups)
    candidates = [g for g in OPTIONAL if g in E.available_groups() and (use_lm or g not in LM_GROUPS)] + \
        (["llm"] if explanations else [])
    print("LLM evidence: " + ("cached explanations, a candidate group" if explanations else
                              "none cached (statistics only; --explain makes them)"))
    seeds = list(range(args.seeds))
    print(f"nested grouped CV: outer {5}-fold by feature id x {len(seeds)} seeds; inside each outer fold, on its "
          f"training part only ({F.INNER_FOLDS}-fold x {F.INNER_REPEATS} inner CV): evidence groups (backward, "
          f"a group dropped while dropping it does not lower the inner mean kappa), C {list(F.C_GRID)}, class weights "
          f"{list(F.CLASS_WEIGHTS)}, temperature")

    pool = candidates
    if not args.no_ablation:
        # The issue's rule, at the outer level: a piece stays a candidate only where it raises the
        # nested-CV mean kappa by more than one sd (core + it vs core; C and class weights chosen
        # in the folds). This prunes on the whole dev file, so the line after the table also gives
        # the nested CV without the pruning.
        started = time.perf_counter()
        ablated = candidates if args.ablation_groups is None else \
            [c for c in candidates if c in args.ablation_groups.split(",")]
        rows, _ = ablation(X, y, gid, names, steps, ablated, seeds, args.jobs)
        majority = Counter(y).most_common(1)[0][0]
        print_ablation(rows, F.kappas(y, [majority] * len(y)))
        print(f"(ablation: {time.perf_counter() - started:.0f} s)")
        pool = [name for name, _, _, kept in rows if kept and name in candidates]
        if args.ablation_groups is not None:  # pieces not ablated this run: the shipped model's choice
            shipped_groups = set(G.load_models()["stats"].groups or [])
            pool = [c for c in candidates if (c in pool if c in ablated else c in shipped_groups)]
        print(f"candidate pieces kept by the ablation rule: {', '.join(pool) or 'none'}; dropped: "
              f"{', '.join(c for c in candidates if c not in pool) or 'none'}")
    lm_candidates = [g for g in candidates if g in LM_GROUPS]
    reuse = None  # the shipped configuration's nested CV, when THE NUMBER is the same run
    if lm_candidates:
        # An LM group is shipped only where it also clears the bar against the shipped configuration.
        started = time.perf_counter()
        lm_rows, shipped_result = lm_beside_shipped(X, y, gid, names, steps, pool, lm_candidates, seeds, args.jobs,
                                                    gate=not args.no_gate)
        print_lm_rows(lm_rows, [g for g in pool if g not in LM_GROUPS])
        print(f"(LM rows: {time.perf_counter() - started:.0f} s)")
        cleared = {g for name, _, _, kept in lm_rows if kept and name.count("+") == 1 for g in [name[1:]]}
        pool = [g for g in pool if g not in LM_GROUPS or g in cleared]
        if not cleared:
            reuse = shipped_result
        print(f"LM groups kept (the ablation rule and the bar beside the shipped configuration): "
              f"{', '.join(g for g in pool if g in LM_GROUPS) or 'none'}")

    started = time.perf_counter()
    gate = not args.no_gate
    result = reuse or F.nested_cv(X, y, gid, names, pool, seeds=seeds, jobs=args.jobs, gate=gate)
    summary = F.summarise(result, y, steps)
    print(f"\nTHE NUMBER: nested CV with the kept pieces as candidates, synonym gate {'on' if gate else 'off'} "
          f"({time.perf_counter() - started:.0f} s)")
    print_summary(summary, result, len(seeds))
    print_shares(y, steps, result)
    other = F.summarise(F.nested_cv(X, y, gid, names, pool, seeds=seeds, jobs=args.jobs, gate=not gate), y, steps)
    print_gate_rows({gate: summary, not gate: other})
    stat_candidates = [c for c in candidates if c not in LM_GROUPS]  # (the LM groups: their own rows above)
    if [c for c in pool if c not in LM_GROUPS] != stat_candidates:
        everything = F.summarise(F.nested_cv(X, y, gid, names, stat_candidates, seeds=seeds, jobs=args.jobs),
                                 y, steps)
        print(f"(for honesty: with every statistical piece a candidate, i.e. without the ablation's pruning on the whole "
              f"dev file: kappa4 {fmt(everything['kappa4'])}, kappa3 {fmt(everything['kappa3'])}, syn recall "
              f"{fmt(everything['recall_concept-synonym'], 2)}, worst share gap {fmt(everything['worst_share_gap'], 1)})")
    language_report(records)

    if args.save:
        save(X, y, gid, names, pool, summary, args.dev.name, len(seeds), explanations is not None, gate)
    return 0


def print_gate_rows(by_gate: dict[bool, dict]) -> None:
    """The synonym gate on and off, the same candidates, every other choice inside the folds: what
    the rule (no concept-synonym without another word of the meaning) costs and buys on the dev file."""
    print("\nthe synonym gate (concept-synonym only where another word of the top word's meaning, not one of its "
          "forms,\nis the max token of >= 2 contexts and the words of the meaning cover >= half the firing contexts), "
          "nested CV, mean ± sd over seeds:")
    print(f"  {'gate':<5} {'kappa4':<16} {'kappa3':<16} {'syn recall':<13} {'syn precision':<14} worst share gap")
    for gate in (False, True):
        r = by_gate[gate]
        print(f"  {'on' if gate else 'off':<5} {fmt(r['kappa4']):<16} {fmt(r['kappa3']):<16} "
              f"{fmt(r['recall_concept-synonym'], 2):<13} {fmt(r['precision_concept-synonym'], 2):<14} "
              f"{fmt(r['worst_share_gap'], 1)}")


def save(X, y, gid, names, candidates, summary, dev_name: str, n_seeds: int, llm: bool, gate: bool = True) -> None:
    """The shipped models: selection + fit on all dev features (the procedure the nested CV rated)."""
    import sklearn

    rows = list(range(len(y)))
    nested = {k: [round(v[0], 4), round(v[1], 4)] for k, v in summary.items()}
    base = {"version": MODEL_VERSION, "trained_on": dev_name, "n": len(y),
            "nested_cv": {"mean_sd": nested, "seeds": n_seeds, "outer_folds": 5, "grouped_by": "feature id",
                          "inner": f"{F.INNER_FOLDS}-fold x {F.INNER_REPEATS}"},
            "libraries": {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                          **{k: s["version"] for k, s in D.evidence_sources().items()}}}
    models = {}
    stat_candidates = [c for c in candidates if c != "llm"]
    fallback = [c for c in stat_candidates if not D.group_sources(c)]
    no_lm = [c for c in stat_candidates if c not in LM_GROUPS]
    for name, cands in (("stats", stat_candidates), *((("stats-nolm", no_lm),) if no_lm != stat_candidates else ()),
                        ("stats-fallback", fallback),
                        *((("both", candidates),) if llm else ())):
        # the gate needs the link group's evidence: not in the fallback (no optional source)
        choice = F.select(X, y, gid, rows, names, cands, seed=0, gate=gate and name != "stats-fallback")
        if name == "both" and "llm" not in choice.groups:
            print("the LLM evidence was not selected on all dev features: no 'both' model shipped")
            continue
        model = F.fit_choice(X, y, rows, names, choice)
        model.info = base | {"choice": {"groups": choice.groups, "C": choice.C, "class_weight": choice.class_weight,
                                        "inner": choice.inner, "gate": choice.gate}}
        models[name] = model
        print(f"{name}: evidence {'+'.join(choice.groups)}, C {choice.C}, class weights {choice.class_weight}, "
              f"T {choice.temperature:.2f}, inner kappa4 {choice.inner['kappa4_mean']:.3f}")
    G.save_models(models, G.MODEL_PATH, info=base)
    print(f"saved {', '.join(models)} to {G.MODEL_PATH}")


if __name__ == "__main__":
    sys.exit(main())
