"""langdetect's answer for many texts at once: the same profiles, the same seeded draws, the
same floating-point operations, computed for a batch of texts in lockstep with numpy.

langdetect (Detector._detect_block) samples n-grams of the text at random (seeded), multiplies
55 language probabilities by each n-gram's profile and renormalises every 5 draws until one
language passes 0.99999, 7 times; in pure Python that is ~2 ms a text, most of a statistical
label's time. Here each text keeps its own `random.Random` seeded as langdetect seeds it, so it
draws the same n-grams; the products and normalisations run as numpy operations over all texts
of the batch (elementwise IEEE arithmetic in langdetect's order; the normalising sum is Python's
own `sum`, as in langdetect), so the result is bit-identical: tests/test_language.py checks it
against `langdetect.detect_langs` on every context of the dev file. The text preparation
(URL/mail removal, Vietnamese normalisation, Latin cleaning, n-gram extraction) follows
langdetect's code with its per-character normalisation cached.
"""

from __future__ import annotations

import random
import re
import sys
from typing import Sequence

import numpy as np
from langdetect import DetectorFactory, detector_factory
from langdetect.detector import Detector
from langdetect.utils.ngram import NGram
from langdetect.utils.unicode_block import unicode_block

UNKNOWN = "unknown"
_SPACES = re.compile(" +")
_LATIN = re.compile("[A-z]")  # langdetect's test is 'A' <= ch <= 'z' (so [\\]^_` count too)


def _row_sums(p: np.ndarray) -> np.ndarray:
    """Each row's sum as langdetect takes it (Python's sum(list)): left to right before Python
    3.12 (np.cumsum is that too), compensated from 3.12 on (then Python's own sum is used)."""
    if sys.version_info < (3, 12):
        return np.cumsum(p, axis=1)[:, -1]
    return np.array([sum(row) for row in p.tolist()])


class BatchDetector:
    """langdetect's default detector (its shipped profiles, DetectorFactory.seed) over batches."""

    def __init__(self) -> None:
        if random.Random._randbelow is not random.Random._randbelow_with_getrandbits:
            raise RuntimeError("this Python's random.choice draws differently; use langdetect itself")
        detector_factory.init_factory()
        factory = detector_factory._factory
        self.langlist: list[str] = list(factory.langlist)
        words = factory.word_lang_prob_map
        self.row = {w: i for i, w in enumerate(words)}
        self.table = np.array(list(words.values()), dtype=np.float64)  # [n-grams, languages]
        self.seed = DetectorFactory.seed  # langdetect reseeds every detection with it (None: unseeded)
        self._norm: dict[int, str] = {}  # ord(char) -> NGram.normalize(char), a str.translate table
        self._non_latin: dict[str, bool] = {}
        self._word_rows: dict[str, list[int]] = {}

    # ---- text -> n-gram rows (Detector.append, cleaning_text, _extract_ngrams) -----------------

    def ngram_rows(self, text: str) -> list[int]:
        text = Detector.URL_RE.sub(" ", text)
        text = Detector.MAIL_RE.sub(" ", text)
        text = NGram.normalize_vi(text)
        text = _SPACES.sub(" ", text[:10000])  # append(): a space after a space is dropped
        chars = set(text)
        for ch in chars - self._non_latin.keys():
            self._non_latin[ch] = ch >= "\u0300" and unicode_block(ch) != "Latin Extended Additional"
            self._norm[ord(ch)] = NGram.normalize(ch)
        latin = len(_LATIN.findall(text))
        non_latin = sum(text.count(ch) for ch in chars if self._non_latin[ch] and not "A" <= ch <= "z")
        if latin * 2 < non_latin:  # cleaning_text(): mostly non-Latin text loses its Latin letters
            text = _LATIN.sub("", text)
        # NGram's buffer restarts at every space, so a text's n-grams are those of its words
        words = text.translate(self._norm).split(" ")
        rows: list[int] = []
        cache = self._word_rows
        for i, word in enumerate(words):
            if not word:
                continue
            key = word if i + 1 < len(words) else word + "\0"  # the last word has no closing space
            got = cache.get(key)
            if got is None:
                got = cache[key] = self._word_ngram_rows(word, closed=i + 1 < len(words))
                if len(cache) > 1_000_000:
                    cache.clear()
            rows.extend(got)
        return rows

    def _word_ngram_rows(self, word: str, closed: bool) -> list[int]:
        """Detector._extract_ngrams over ' ' + word (+ ' '), for already normalised chars."""
        rows: list[int] = []
        grams, capital = " ", False
        for c in word + (" " if closed else ""):
            last = grams[-1]
            if len(grams) >= 3:
                grams = grams[1:]
            grams += c
            if c.isupper():
                if last.isupper():
                    capital = True
            else:
                capital = False
            if capital:
                continue
            for n in (1, 2, 3):
                if len(grams) < n:
                    break
                w = grams[-n:]
                if w != " ":
                    r = self.row.get(w)
                    if r is not None:
                        rows.append(r)
        return rows

    # ---- the seeded trials, all texts in lockstep --------------------------------------------

    def probabilities(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """langdetect's averaged language probabilities per text (None: no n-gram, langdetect's
        'No features in text' error)."""
        n_lang = len(self.langlist)
        grams = [self.ngram_rows(t) for t in texts]
        live = [i for i, g in enumerate(grams) if g]
        out: list[np.ndarray | None] = [None] * len(texts)
        if not live:
            return out
        m = len(live)
        grams = [grams[i] for i in live]
        rngs = [random.Random() for _ in live]
        for r in rngs:
            r.seed(self.seed)
        trial = np.zeros(m, dtype=np.int64)
        done = np.zeros(m, dtype=np.int64)  # draws made in the current trial (langdetect's i + 1)
        weight = np.zeros(m)
        langprob = np.zeros((m, n_lang))
        prob = np.full((m, n_lang), 1.0 / n_lang)

        def start_trial(j: int) -> None:
            prob[j] = 1.0 / n_lang
            weight[j] = (Detector.ALPHA_DEFAULT + rngs[j].gauss(0.0, 1.0) * Detector.ALPHA_WIDTH) / Detector.BASE_FREQ
            done[j] = 0

        for j in range(m):
            start_trial(j)
        active = np.arange(m)
        while len(active):
            # each text draws up to its next convergence check (i % 5 == 0): 1 draw at i = 0, then 5
            first = done[active] == 0
            k = 1 if first.all() else 5
            picks: list[int] = []
            for j, n in zip(active.tolist(), np.where(first, 1, k).tolist()):
                g, bits = grams[j], rngs[j].getrandbits
                size = len(g)
                width = size.bit_length()
                for _ in range(n):  # random.choice(g), inlined: Random._randbelow_with_getrandbits
                    r = bits(width)
                    while r >= size:
                        r = bits(width)
                    picks.append(g[r])
                if n < k:
                    picks.extend([0] * (k - n))
            factors = weight[active, None, None] + self.table[np.array(picks).reshape(len(active), k)]
            p = prob[active]
            for s in range(k):  # sequential products, as langdetect multiplies draw by draw
                f = factors[:, s]
                if s:  # texts at their first draw (i = 0) have no draws 2..5
                    f = np.where(first[:, None], 1.0, f)
                p = p * f
            p = p / _row_sums(p)[:, None]
            prob[active] = p
            done[active] += np.where(first, 1, k)
            finished = (p.max(axis=1) > Detector.CONV_THRESHOLD) | (done[active] - 1 >= Detector.ITERATION_LIMIT)
            for j in active[finished].tolist():
                langprob[j] += prob[j] / 7
                trial[j] += 1
                if trial[j] < 7:
                    start_trial(j)
            active = active[trial[active] < 7]
        for j, i in enumerate(live):
            out[i] = langprob[j]
        return out

    def detect(self, texts: Sequence[str]) -> list[str]:
        """langdetect's best language per text (detect_langs(text)[0].lang), 'unknown' where it has none."""
        out = []
        for p in self.probabilities(texts):
            if p is None or not (p > Detector.PROB_THRESHOLD).any():
                out.append(UNKNOWN)
            else:
                out.append(self.langlist[int(np.argmax(p))])
        return out
