"""A latent's evidence: the feature vector the granularity model reads, and one line that shows it.

The features come in groups (EVIDENCE_GROUPS). `core` and `context` need no library; the others
need the `ja` extra (autointerp/labels/dictionary.py) and are simply absent without it
(`available_groups()`; the decision then falls back to a model fitted without them):
- gloss: JMdict links a Japanese and an English max token of the same meaning (犬 ~ dog), looked
  up in both directions; gloss_same_script links two English (in ~ at) or two Japanese
  (本名 ~ 通称) max tokens through a shared translation;
- loanword: a katakana max token's source spelling links it to an English max token;
- lemma: the forms of one word count as one (English lemmas from lemminflect: run / running;
  Japanese from UniDic: される / した -> 為る), and how much of the contexts the top word's
  other forms take;
- link: the synonym link (relations.synonym_link): the words of the top word's meaning and the
  share of the contexts they cover, not only whether a link exists;
- fragment (no library): max tokens that are pieces of a longer word in their context (フォ of
  フォルダ, "recogn" of "recognized").
Every dictionary and loanword link is between content words (dictionary.is_function_word).
Never an input: the checkpoint step or feature id.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any, Iterable

from autointerp.display import shown
from autointerp.labels import language
from autointerp.labels.dictionary import evidence_sources, group_sources, inside_word, is_function_word
from autointerp.labels.lm_evidence import LM_GROUPS
from autointerp.labels.relations import LINK_SOURCES, SynonymLink, linked, same_word, string_related, synonym_link
from autointerp.labels.tokens import token_info
from autointerp.schema import GRANULARITIES, Explanation, FeatureRecord, Scores

# Feature names per evidence group. `core` is always used; the fitting chooses among the others
# inside cross-validation folds (autointerp/labels/fit.py). The model file lists what it was fitted on.
EVIDENCE_GROUPS: dict[str, list[str]] = {
    "core": [
        "top1_share", "top2_share", "variant_share", "family_share", "cross_script_variant_share",
        "distinct_ratio", "entropy_norm", "en_share", "ja_share", "other_share", "script_mix",
        "junk_share", "digit_share", "katakana_share", "kanji_share", "char_class_entropy",
        "frac_active", "mean_active_level", "high_tokens_per_context", "n_contexts_norm",
        "activating_ratio", "log_density", "has_density",
        "top2_related", "variant_types_ratio", "prev_top_share", "max_position_mean",
    ],
    # JMdict both ways: Japanese -> English glosses, and English -> Japanese headwords
    "gloss": ["gloss_ja_en_share", "gloss_ja_en_top2", "gloss_en_ja_share", "gloss_en_ja_top2"],
    "loanword": ["loanword_share", "loanword_top2"],
    "lemma": ["lemma_top1_share", "lemma_distinct_ratio", "inflection_share", "other_variant_share"],
    "link": ["link_coverage", "link_partner_share", "link_partner_top", "link_cross_share", "link_words",
             "link_two", "link_holds", "function_share"],
    "fragment": ["fragment_share", "fragment_top1"],
    "gloss_same_script": ["gloss_same_script_share", "gloss_same_script_top2"],
    "context": ["ctx_cohesion", "ctx_top_df", "next_top_share", "cohesion_x_diverse", "top1_x_incoherent"],
    # what a multilingual LM says the top max tokens mean (lm_meaning, lm_translation, lm_same):
    # computed by autointerp/labels/lm_evidence.py, not by stat_features (they need the LM)
    **LM_GROUPS,
}
LLM_FEATURES = [*(f"vote_{g}" for g in GRANULARITIES), "vote_missing", "llm_confidence", "llm_cross_lingual"]
SCORE_METHODS = ("simulation", "detection", "fuzzing")
SCORE_FEATURES = [*SCORE_METHODS, "scores_missing"]
STAT_FEATURES = [n for names in EVIDENCE_GROUPS.values() for n in names]


def available_groups() -> set[str]:
    """The evidence groups this install can compute (those whose source is present)."""
    sources = {name for name, s in evidence_sources().items() if s["available"]}
    return {g for g in EVIDENCE_GROUPS if group_sources(g) <= sources}


@dataclass
class Evidence:
    """A latent's feature vector and what it is built from (kept in Label.evidence)."""

    features: dict[str, float]
    top_tokens: list[tuple[str, int]]
    problem: str | None  # why the record cannot be labelled (then: uninterpretable)
    link: SynonymLink | None = None  # the words of the top word's meaning (with the link sources)


def _level_counts(contexts: list) -> dict[int, int]:
    """How many tokens of the contexts are at each level (0..10)."""
    try:  # levels are 0..10: as bytes, eleven C-speed counts (a Counter costs ~50 ns a token)
        data = b"".join(map(bytes, (c.levels for c in contexts)))
        counts = {k: data.count(k) for k in range(11)}
        if sum(counts.values()) == len(data):
            return counts
    except (ValueError, TypeError):  # a level outside 0..255
        pass
    return Counter(chain.from_iterable(c.levels for c in contexts))


def stat_features(record: FeatureRecord, groups: Iterable[str] | None = None) -> Evidence:
    """Features from the record's own contexts only (never its step or feature id).

    `core` and the optional `groups` (default: all) are computed; a group whose library is absent
    comes out as zeros (the decision then uses a model fitted without it)."""
    groups = set(EVIDENCE_GROUPS) if groups is None else set(groups)
    n_ctx = len(record.contexts)
    if n_ctx == 0:
        return Evidence({}, [], "no contexts")
    firing: list[tuple[int, Any]] = []  # (max index, context)
    for c in record.contexts:
        i = c.max_index  # cached on the context: the language profile reads it too
        if i >= 0 and (c.activations if c.activations is not None else c.levels)[i] > 0:
            firing.append((i, c))
    n = len(firing)
    if n == 0:
        return Evidence({}, [], "no activating token in any context")
    keys, norms, token_scripts, token_classes, _ = zip(*map(token_info, [c.tokens[i] for i, c in firing]))
    counts = Counter(keys)
    top = counts.most_common()
    top_token, top_count = top[0]
    junk = norms.count("")
    if junk == n and top_count / n < 0.8:
        return Evidence({}, top[:10], "max tokens are only whitespace or byte fragments")
    classes = Counter(token_classes)
    scripts = Counter(token_scripts)  # each context's max token
    # Only tokens of a script that can relate to the top one are looked at (string_related and
    # linked are False for any other pair): a diffuse latent has ~50 distinct max tokens.
    script_of = {t: language.token_script(t) for t in counts}
    top_script = script_of[top_token]
    same_script = [t for t in counts if script_of[t] == top_script and t != top_token] if top_script != "other" else []
    other_script = {"en": "ja", "ja": "en"}.get(top_script)
    cross_script = [t for t in counts if script_of[t] == other_script]  # en <-> ja
    spelled = same_script + [t for t in counts if (script_of[t], top_script) in (("other", "en"), ("en", "other"))]
    related = set(filter(partial(string_related, top_token), spelled))
    variants = [t for t in counts if t in related]
    variant_count = sum(counts[t] for t in variants)
    cross_variant = sum(counts[t] for t in variants if script_of[t] != top_script)
    second = top[1][0] if len(top) > 1 else ""
    level_counts = _level_counts(record.contexts)
    n_levels = sum(level_counts.values())
    n_active = n_levels - level_counts.get(0, 0)
    sum_active = sum(level * k for level, k in level_counts.items() if level > 0)
    high_per_ctx = sum(k for level, k in level_counts.items() if level >= 5) / n_ctx
    ent = language.entropy(counts)
    f = {
        "top1_share": top_count / n,
        "top2_share": (top[1][1] / n) if len(top) > 1 else 0.0,
        "variant_share": variant_count / n,
        "family_share": (top_count + variant_count) / n,
        "cross_script_variant_share": cross_variant / n,
        "distinct_ratio": len(counts) / n,
        "entropy_norm": ent / math.log2(n) if n > 1 else 0.0,
        "en_share": scripts.get("en", 0) / n,
        "ja_share": scripts.get("ja", 0) / n,
        "other_share": scripts.get("other", 0) / n,
        "script_mix": min(scripts.get("en", 0), scripts.get("ja", 0)) / n,
        "junk_share": classes.get("junk", 0) / n,
        "digit_share": classes.get("digit", 0) / n,
        "katakana_share": classes.get("katakana", 0) / n,
        "kanji_share": classes.get("kanji", 0) / n,
        "char_class_entropy": language.entropy(classes) / math.log2(7),
        "frac_active": n_active / n_levels if n_levels else 0.0,
        "mean_active_level": (sum_active / n_active / 10.0) if n_active else 0.0,
        "high_tokens_per_context": min(high_per_ctx, 10.0) / 10.0,
        "n_contexts_norm": min(n_ctx, 50) / 50.0,
        "activating_ratio": n / n_ctx,
        "log_density": math.log10(max(record.density, 1e-7)) / 7.0 + 1.0 if record.density else 0.0,
        "has_density": 1.0 if record.density else 0.0,
        # the runner-up max token is another form of the top one (synonymy)
        "top2_related": float(bool(second) and second in variants),
        "variant_types_ratio": len(variants) / len(counts),
        # context, not token: fires after one token (e.g. after "(") / at one place in the text
        "prev_top_share": max(Counter(token_info(c.tokens[i - 1]).key if i > 0 else "<start>"
                                      for i, c in firing).values()) / n,
        "max_position_mean": sum(i / max(len(c.tokens) - 1, 1) for i, c in firing) / n,
    }
    # Cross-script links to the top token, one pair of features per dictionary source.
    sources = [*(LINK_SOURCES[:2] if "gloss" in groups else ()),
               *(("loanword",) if "loanword" in groups else ()),
               *(("gloss_same_script",) if "gloss_same_script" in groups else ())]
    for source in sources:
        share = sum(counts[t] for t in (same_script if source == "gloss_same_script" else cross_script)
                    if linked(top_token, t, source)) / n
        f[f"{source}_share"] = share
        f[f"{source}_top2"] = float(bool(second) and linked(top_token, second, source))
    if "lemma" in groups:  # the forms of one word count as one
        words: list[list] = []  # [head token, contexts]
        for t, k in top:
            word = next((w for w in words if same_word(w[0], t)), None)
            if word is None:
                words.append([t, k])
            else:
                word[1] += k
        f["lemma_top1_share"] = max(k for _, k in words) / n
        f["lemma_distinct_ratio"] = len(words) / n
        f["inflection_share"] = sum(counts[t] for t in counts if t != top_token and same_word(top_token, t)) / n
        f["other_variant_share"] = sum(counts[t] for t in variants if not same_word(top_token, t)) / n
    link = synonym_link(top, n, fragments=fragment_shares(firing, [t for t, _ in top[1:12]])) \
        if group_sources("link") <= _present() else None
    if "link" in groups and link is not None:
        partner_scripts = [(script_of.get(t) or language.token_script(t), k) for w in link.partners for t, k in w]
        f["link_coverage"] = link.covered / n
        f["link_partner_share"] = link.partner_count / n
        f["link_partner_top"] = max((sum(k for _, k in w) for w in link.partners), default=0) / n
        f["link_cross_share"] = sum(k for sc, k in partner_scripts if sc != top_script) / n
        f["link_words"] = min(len(link.partners), 3) / 3
        # another word of the meaning is the max token of two contexts or more (one is chance)
        f["link_two"] = float(any(sum(k for _, k in w) >= 2 for w in link.partners))
        # ... and the words of the meaning are the max tokens of at least half the firing contexts
        f["link_holds"] = float(f["link_two"] > 0 and link.covered >= n / 2)
        f["function_share"] = sum(k for t, k in counts.items() if is_function_word(t)) / n
    if "fragment" in groups:
        glued = [_glued(c.tokens, i) for i, c in firing]
        f["fragment_share"] = sum(glued) / n
        top_glued = [g for g, key in zip(glued, keys) if key == top_token]
        f["fragment_top1"] = sum(top_glued) / len(top_glued)
    if "context" in groups:
        f.update(_context_features(firing, f["top1_share"], f["distinct_ratio"]))
    return Evidence(f, top[:10], None, link)


def fragment_shares(firing: list[tuple[int, Any]], wanted: list[str]) -> dict[str, float]:
    """For each of the `wanted` max tokens (keys): the share of its firing contexts in which it is
    a piece of a longer word. Latin letters: _glued; kana: UniDic reads it inside a longer word
    (dictionary.inside_word, up to 6 characters each side). Kanji are not judged: a kanji keeps
    its meaning inside a compound (救 of 救助)."""
    want = set(wanted)
    seen: Counter = Counter()
    pieces: Counter = Counter()
    for i, c in firing:
        key = token_info(c.tokens[i]).key
        if key not in want:
            continue
        seen[key] += 1
        tok = language.clean_token(c.tokens[i])
        core = tok.strip()
        if core and (_is_kana(core[0]) or _is_kana(core[-1]) or "\u3041" <= core[0] <= "\u309f"):
            left = "".join(map(language.clean_token, c.tokens[max(0, i - 4):i]))[-6:]
            right = "".join(map(language.clean_token, c.tokens[i + 1:i + 5]))[:6]
            inside = inside_word(left, tok, right)
            pieces[key] += bool(inside) if inside is not None else _glued(c.tokens, i)
        else:
            pieces[key] += _glued(c.tokens, i)
    return {k: pieces[k] / seen[k] for k in seen}


def _present() -> set[str]:
    return {name for name, s in evidence_sources().items() if s["available"]}


def _glued(tokens: list[str], i: int) -> bool:
    """Is the token at i a piece of a longer word in its context: Latin letters that run on into
    the token before or after it with no space ("recogn" + "ized"), or short katakana that run on
    into more katakana (フォ + ルダ; a katakana word of 4 or more, as ファイル in ファイルシステム,
    is a word of a compound)? Needs no library."""
    tok = language.clean_token(tokens[i])
    if not tok or tok != tok.strip():  # a leading space starts a word
        return _latin_run(tok.rstrip(), tokens[i + 1] if i + 1 < len(tokens) else "") if tok.strip() else False
    before = language.clean_token(tokens[i - 1]) if i > 0 else ""
    after = language.clean_token(tokens[i + 1]) if i + 1 < len(tokens) else ""
    if _is_kana(tok[0]) or _is_kana(tok[-1]):
        return len(tok) <= 3 and ((bool(before) and _is_kana(before[-1]) and _is_kana(tok[0]))
                                  or (bool(after) and _is_kana(after[0]) and _is_kana(tok[-1])))
    return (bool(before) and before[-1].isascii() and before[-1].isalpha() and tok[0].isascii() and tok[0].isalpha()) \
        or _latin_run(tok, tokens[i + 1] if i + 1 < len(tokens) else "")


def _latin_run(tok: str, after_raw: str) -> bool:
    after = language.clean_token(after_raw)
    return bool(tok) and bool(after) and tok[-1].isascii() and tok[-1].isalpha() and after[0].isascii() \
        and after[0].isalpha()


def _is_kana(ch: str) -> bool:
    return "\u30a1" <= ch <= "\u30fa" or ch == "ー"


_CONTENT_KEY: dict[str, str] = {}  # raw token -> its key if a content word, else '' (bounded by the vocabulary)


def _context_features(firing: list[tuple[int, Any]], top1_share: float, distinct_ratio: float) -> dict[str, float]:
    """Beyond the max token: do the contexts share a topic (content words recurring across
    contexts) while their max tokens differ (concept-semantic), or does one token fire in
    unrelated contexts (token)?"""
    n = len(firing)
    max_keys = Counter(token_info(c.tokens[i]).key for i, c in firing)
    per_ctx: list[set[str]] = []
    for i, c in firing:
        distinct = set(c.tokens)
        try:  # C-speed lookups once every token has been seen
            words = set(map(_CONTENT_KEY.__getitem__, distinct))
        except KeyError:
            for raw in distinct:
                if raw not in _CONTENT_KEY:
                    info = token_info(raw)
                    _CONTENT_KEY[raw] = info.key if info.content else ""
            words = set(map(_CONTENT_KEY.__getitem__, distinct))
        words.discard("")
        words.discard(token_info(c.tokens[i]).key)
        per_ctx.append(words)
    df = Counter(chain.from_iterable(per_ctx))
    # how often a context's content words recur in the other contexts (0: unrelated texts)
    cohesion = 0.0
    if n > 1:
        cohesion = sum((sum(map(df.__getitem__, words)) - len(words)) / len(words)
                       for words in per_ctx if words) / n / (n - 1)
    shared = [k for k, _ in df.most_common(3) if k not in max_keys]
    nexts = Counter(token_info(c.tokens[i + 1]).key if i + 1 < len(c.tokens) else "<end>" for i, c in firing)
    return {
        "ctx_cohesion": cohesion,
        "ctx_top_df": (df[shared[0]] / n) if shared else 0.0,
        "next_top_share": nexts.most_common(1)[0][1] / n,
        "cohesion_x_diverse": cohesion * distinct_ratio,
        "top1_x_incoherent": top1_share * (1.0 - min(cohesion * 10.0, 1.0)),
    }


def llm_features(explanation: Explanation | None, scores: Scores | None) -> dict[str, float]:
    f = {name: 0.0 for name in [*LLM_FEATURES, *SCORE_FEATURES]}
    if explanation is None or explanation.error or explanation.granularity not in GRANULARITIES:
        f["vote_missing"] = 1.0
    else:
        f[f"vote_{explanation.granularity}"] = 1.0
        f["llm_confidence"] = float(min(max(explanation.confidence or 0.0, 0.0), 1.0))
        f["llm_cross_lingual"] = 1.0 if explanation.cross_lingual else 0.0
    values = [getattr(scores, k, None) if scores else None for k in SCORE_METHODS]
    if all(v is None for v in values):
        f["scores_missing"] = 1.0
    for key, v in zip(SCORE_METHODS, values):
        f[key] = 0.0 if v is None or not math.isfinite(v) else float(v)
    return f


def feature_vector(record: FeatureRecord, explanation: Explanation | None = None,
                   scores: Scores | None = None, groups: Iterable[str] | None = None) -> Evidence:
    ev = stat_features(record, groups)
    if ev.problem is None:
        ev.features.update(llm_features(explanation, scores))
    return ev


# ---- a one-line statement of the evidence --------------------------------------------------------

def _show(raw: str) -> str:
    return f"“{shown(raw, 'terminal')}”"


def evidence_summary(record: FeatureRecord, top_n: int = 3, tokens: list[str] | None = None,
                     link: dict | None = None) -> str:
    """A deterministic line from the decision's own evidence: the top max tokens with counts, the
    synonym link where there is one (what links the top word to another word of its meaning, and
    how many of the firing contexts the words of that meaning cover), and the max tokens'
    languages, e.g. `“ more” 10/50 · “また” 7/50 (JMdict: また = more, again; covers 17/50) · en+ja`.
    `tokens`: language.max_tokens(record), when the caller has them; `link`: the label's
    evidence["link"] (SynonymLink.to_dict; {} for none), else found here the same way."""
    n_ctx = len(record.contexts)
    raws = language.max_tokens(record) if tokens is None else tokens
    if not raws:
        return f"no activating token in {n_ctx} contexts"
    raw_counts = Counter(raws)
    key_of = {t: token_info(t).key for t in raw_counts}  # each distinct raw token's key, once
    counts = Counter(map(key_of.__getitem__, raws))
    top = [k for k, _ in counts.most_common()[:top_n]]
    spelling: dict[str, str] = {}  # key -> its most common raw spelling
    for t, _ in raw_counts.most_common():
        spelling.setdefault(key_of[t], t)
    parts = {k: f"{_show(spelling[k])} {counts[k]}/{n_ctx}" for k in top}
    extra = []
    if link is None:  # found the way the decision finds it
        found = stat_features(record, groups=()).link
        link = found.to_dict() if found is not None and found.partners else {}
    if link and link.get("partners"):
        partner = link["partners"][0][0][0]
        note = f"({link['text'] + '; ' if link.get('text') else ''}covers {link['covered']}/{n_ctx})"
        if partner in parts:
            parts[partner] += f" {note}"
        else:
            extra.append(f"{_show(spelling.get(partner, partner))} {counts.get(partner, 0)}/{n_ctx} {note}")
    scripts = Counter(token_info(t).script for t in raws)
    langs = "+".join(s for s in ("en", "ja") if scripts.get(s, 0) / len(raws) >= 0.1) or "other"
    return " · ".join([*(parts[k] for k in top), *extra, langs])
