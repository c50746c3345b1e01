"""A synthetic whole-SAE checkpoint: feature records for N latents built from real corpus windows.

Used by evals/bench_scale.py (and the tests) where a real 32,768-latent SAE is out of reach. As
in a real SAE, contexts repeat across latents: every latent draws its top contexts from one pool
of windows of the demo corpus's documents (the first tokens of each document and later windows,
split into word/kana/kanji-pair tokens by a simple splitter). Latents come in kinds: "token"
latents peak on one token type, "mixed" ones on a few, "diffuse" ones anywhere, a few are dead.
Records carry what `collect` writes: 50 top contexts with levels and activations, 35 negatives
(10 similar, 5 same-token, 20 random), density, max activation, negative kinds and document ids.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterator

import numpy as np

from autointerp.schema import Context, FeatureRecord

_TOKEN = re.compile(r" ?[A-Za-z]+| ?\d+|[\u3040-\u309f]+|[\u30a0-\u30ff]+|[\u4e00-\u9fff]{1,2}|\s|[^\sA-Za-z\d]")


def split_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def window_pool(texts: list[str], width: int = 64, stride: int = 24, min_tokens: int = 16) -> list[list[str]]:
    """Windows of `width` tokens from each text: its start, then every `stride` tokens."""
    pool = []
    for text in texts:
        tokens = split_tokens(text)
        for start in range(0, max(len(tokens) - min_tokens, 0) + 1, stride):
            window = tokens[start:start + width]
            if len(window) >= min_tokens:
                pool.append(window)
    return pool


def _sig5(x: np.ndarray) -> np.ndarray:
    """Rounded to 5 significant digits, as collect rounds activations (records.round_sig)."""
    exp = np.floor(np.log10(np.maximum(np.abs(x), 1e-30)))
    scale = 10.0 ** (4 - exp)
    return np.round(x * scale) / scale


class SyntheticSAE:
    def __init__(self, pool: list[list[str]], n_latents: int, seed: int = 0, top_k: int = 50,
                 n_similar: int = 10, n_same_token: int = 5, n_random: int = 20):
        self.pool, self.n_latents, self.seed = pool, n_latents, seed
        self.top_k, self.n_similar, self.n_same, self.n_random = top_k, n_similar, n_same_token, n_random
        where: dict[str, list[tuple[int, int]]] = defaultdict(list)  # token -> (window, position) occurrences
        for w, tokens in enumerate(pool):
            for i, token in enumerate(tokens):
                if token.strip():
                    where[token].append((w, i))
        self.where = {t: np.array(occ, dtype=np.int64) for t, occ in where.items() if len({w for w, _ in occ}) >= 3}
        self.anchors = sorted(self.where)
        self.lengths = np.array([len(t) for t in pool])
        # popular windows are drawn more often (Zipf-like), as a real SAE's top contexts concentrate
        rank = np.random.default_rng(seed).permutation(len(pool)) + 1
        self.popularity = (1.0 / rank ** 0.8) / (1.0 / rank ** 0.8).sum()

    def record(self, latent: int) -> FeatureRecord:
        rng = np.random.default_rng([self.seed, latent])
        kind = rng.choice(["token", "mixed", "diffuse", "dead"], p=[0.45, 0.25, 0.27, 0.03])
        n_tokens = 153_114
        if kind == "dead":
            return FeatureRecord("synthetic", 2, 600, latent, [], [], density=0.0, max_activation=0.0,
                                 extra={"negative_kinds": [], "context_doc_ids": [], "negative_doc_ids": [],
                                        "active_contexts": 0, "n_tokens": n_tokens})
        anchors = [self.anchors[i] for i in rng.choice(len(self.anchors), 1 if kind == "token" else 4, replace=False)]
        n_top = self.top_k + self.n_similar
        if kind != "diffuse":  # one random occurrence of an anchor per window that holds one
            occ = np.concatenate([self.where[a] for a in anchors])
            occ = occ[rng.permutation(len(occ))]
            windows, first = np.unique(occ[:, 0], return_index=True)
            hits = dict(zip(windows.tolist(), occ[first, 1].tolist()))
        else:
            hits = {}
        candidates = np.array(sorted(hits), dtype=np.int64)
        if len(candidates) < n_top:
            extra = rng.choice(len(self.pool), n_top, replace=False, p=self.popularity)
            candidates = np.unique(np.concatenate([candidates, extra]))
        chosen = rng.choice(candidates, min(n_top, len(candidates)), replace=False)
        n = len(chosen)
        lengths = self.lengths[chosen]
        top_value = float(rng.uniform(2.0, 20.0))
        peaks = np.sort(rng.uniform(0.05, 1.0, n))[::-1] * top_value
        peaks[0] = top_value
        at = (rng.random(n) * lengths).astype(np.int64)  # a random position, or an anchor's
        for j, w in enumerate(chosen.tolist()):
            if w in hits:
                at[j] = hits[w]
        acts = np.zeros((n, int(lengths.max())))
        others = (rng.random((n, 5)) * lengths[:, None]).astype(np.int64)
        keep = rng.random((n, 5)) < 0.5
        rows = np.repeat(np.arange(n), 5)[keep.reshape(-1)]
        acts[rows, others[keep]] = (rng.uniform(0.05, 0.6, (n, 5)) * peaks[:, None])[keep]
        acts[np.arange(n), at] = peaks
        acts = _sig5(acts)
        levels = np.where(acts > 0, np.clip(np.round(acts * 10 / top_value), 1, 10), 0).astype(np.int64)
        acts_l, levels_l = acts.tolist(), levels.tolist()
        contexts = [Context(list(self.pool[w]), levels_l[j][:length], acts_l[j][:length])
                    for j, (w, length) in enumerate(zip(chosen.tolist(), lengths.tolist()))]
        silent = rng.choice(len(self.pool), self.n_same + self.n_random, replace=False)
        negatives = [Context(list(self.pool[w]), [0] * len(self.pool[w])) for w in silent.tolist()]
        kinds = ["similar"] * (len(contexts) - self.top_k) + ["same-token"] * self.n_same + ["random"] * self.n_random
        return FeatureRecord(
            model="synthetic", layer=2, checkpoint_step=600, feature=latent,
            contexts=contexts[:self.top_k], negatives=contexts[self.top_k:] + negatives,
            density=float(f"{rng.uniform(1e-4, 0.05):.5g}"), max_activation=float(f"{top_value:.5g}"),
            extra={"negative_kinds": kinds, "context_doc_ids": chosen[:self.top_k].tolist(),
                   "negative_doc_ids": chosen[self.top_k:].tolist() + silent.tolist(),
                   "active_contexts": int(rng.integers(len(contexts), 2000)), "n_tokens": n_tokens})

    def records(self) -> Iterator[FeatureRecord]:
        for latent in range(self.n_latents):
            yield self.record(latent)


def demo_pool() -> list[list[str]]:
    """Windows of the demo corpus (the Debian Reference, en + ja)."""
    from autointerp.lm.corpus import load_corpus

    return window_pool([d.text for d in load_corpus("debian-reference")])
