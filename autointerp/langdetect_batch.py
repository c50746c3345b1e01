"""langdetect's answer for many texts at once: the same profiles, the same seeded draws, the
same floating-point operations, computed for a batch of texts in lockstep with numpy.

langdetect (Detector._detect_block) samples n-grams of the text at random (seeded), multiplies
55 language probabilities by each n-gram's profile and renormalises every 5 draws until one
language passes 0.99999, 7 times; in pure Python that is ~2 ms a text, most of a statistical
label's time. langdetect reseeds one Mersenne Twister with the same seed for every text, so all
texts read the same stream of 32-bit words: it is drawn once, and each text's draws
(random.choice = a word shifted to the list's bit length, redrawn while too large; gauss from
two 53-bit random() values) are read from it at the text's own position, as Random would. The
products and normalisations run as numpy operations over 512 texts in flight (elementwise IEEE
arithmetic in langdetect's order; the normalising sum is summed as Python's `sum` does), so the
result is bit-identical: tests/test_scale.py checks it against langdetect's own probabilities on
the dev file's contexts. The text preparation (URL/mail removal, Vietnamese normalisation, Latin
cleaning, n-gram extraction) follows langdetect's code, with its per-character normalisation and
each word's n-grams cached (its n-gram buffer restarts at every space).
"""

from __future__ import annotations

import gc
import math
import random
import re
import sys
from itertools import chain
from typing import Sequence

import numpy as np
from langdetect import DetectorFactory, detector_factory
from langdetect.detector import Detector
from langdetect.utils.ngram import NGram

UNKNOWN = "unknown"
_SPACES = re.compile(" +")
_TWOPI = 2.0 * math.pi  # random.TWOPI
SLOTS = 512  # texts in flight at once
_DMARKS = frozenset(NGram.DMARK_CLASS)  # the combining marks NGram.normalize_vi acts on
# cleaning_text counts a char >= U+0300 "and unicode_block(ch) != 'Latin Extended Additional'",
# but unicode_block returns a number, never that name: every char >= U+0300 counts
_NON_LATIN = re.compile("[^\x00-\u02ff]")
_LATIN = re.compile("[A-z]")  # langdetect's test is 'A' <= ch <= 'z' (so [\\]^_` count too)


def _row_sums(p: np.ndarray) -> np.ndarray:
    """Each row's sum as langdetect takes it (Python's sum(list)): left to right before Python
    3.12 (np.cumsum is that too), compensated from 3.12 on (then Python's own sum is used)."""
    if sys.version_info < (3, 12):
        return np.cumsum(p, axis=1)[:, -1]
    return np.array([sum(row) for row in p.tolist()])


def latin_count(text: str) -> int:
    return len(_LATIN.findall(text))


class _Computed(dict):
    """key -> compute(key), computed on first use."""

    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def __missing__(self, key):
        value = self[key] = self.compute(key)
        return value


LONG_WORD = 24  # longer words (a Japanese run between spaces) rarely repeat: not kept


class BatchDetector:
    """langdetect's default detector (its shipped profiles, DetectorFactory.seed) over batches."""

    def __init__(self) -> None:
        if random.Random._randbelow is not random.Random._randbelow_with_getrandbits:
            raise RuntimeError("this Python's random.choice draws differently; use langdetect itself")
        collecting = gc.isenabled()
        gc.disable()  # ~90k profile entries are built: the collector would scan them again and again
        try:
            detector_factory.init_factory()
            factory = detector_factory._factory
            self.langlist: list[str] = list(factory.langlist)
            words = factory.word_lang_prob_map
            self.row = dict(zip(words, range(len(words))))
            self.table = np.fromiter(chain.from_iterable(words.values()), dtype=np.float64,
                                     count=len(words) * len(self.langlist)).reshape(len(words), len(self.langlist))
        finally:
            if collecting:
                gc.enable()
        self.seed = DetectorFactory.seed  # langdetect reseeds every detection with it
        if self.seed is None:
            raise RuntimeError("langdetect is unseeded (DetectorFactory.seed is None): nothing to reproduce")
        # every detection reseeds the same generator, so all texts read one stream of words
        self._mt = random.Random()
        self._mt.seed(self.seed)
        self._stream = np.zeros(0, dtype=np.int64)
        self._norm: dict[int, str] = {}  # ord(char) -> NGram.normalize(char), a str.translate table
        self._seen: set[str] = set()  # chars in _norm
        self._word_rows = _Computed(lambda word: self._word_ngram_rows(word, closed=True))
        self._end_rows = _Computed(self._end_grams)

    # ---- text -> n-gram rows (Detector.append, cleaning_text, _extract_ngrams) -----------------

    def ngram_rows(self, text: str) -> list[int]:
        if "://" in text:  # the patterns cannot match otherwise
            text = Detector.URL_RE.sub(" ", text)
        if "@" in text:
            text = Detector.MAIL_RE.sub(" ", text)
        if not _DMARKS.isdisjoint(text):
            text = NGram.normalize_vi(text)
        text = _SPACES.sub(" ", text[:10000])  # append(): a space after a space is dropped
        chars = set(text)
        for ch in [ch for ch in chars if ch not in self._seen]:  # (not `chars - seen`: that walks every known char)
            self._seen.add(ch)
            self._norm[ord(ch)] = NGram.normalize(ch)
        non_latin = len(_NON_LATIN.findall(text))  # what cleaning_text weighs the Latin letters against
        if non_latin and latin_count(text) * 2 < non_latin:
            text = _LATIN.sub("", text)  # cleaning_text(): mostly non-Latin text loses its Latin letters
        # NGram's buffer restarts at every space, so a text's n-grams are those of its words
        *words, last = text.translate(self._norm).split(" ")
        cache = self._word_rows
        if len(cache) > 1_000_000:
            cache.clear()
        if len(self._end_rows) > 1_000_000:
            self._end_rows.clear()
        rows = list(chain.from_iterable(
            cache[w] if len(w) <= LONG_WORD else self._word_ngram_rows(w, closed=True) for w in words if w))
        if last:  # the last word has no closing space
            rows.extend(self._word_ngram_rows(last, closed=False))
        return rows

    def _word_ngram_rows(self, word: str, closed: bool) -> list[int]:
        """Detector._extract_ngrams over ' ' + word (+ ' '), for already normalised chars: after
        each char its 1-, 2- and 3-gram, except after an upper-case char that follows another
        (NGram.capitalword) and the 1-gram ' '. What comes after a char depends only on it and
        the two before it, so the rows are looked up by those (at most) 3 chars."""
        p = " " + word + (" " if closed else "")
        ends = self._end_rows
        return list(chain(ends[p[:2]], chain.from_iterable(map(ends.__getitem__, [p[i:i + 3] for i in range(len(p) - 2)]))))

    def _end_grams(self, end: str) -> tuple[int, ...]:
        """The rows of the grams NGram yields after the last char of `end` (the 2 or 3 chars
        ending there; 2 at the first char of a word, after its space)."""
        if len(end) == 3 and end[2].isupper() and end[1].isupper():  # NGram.capitalword
            return ()
        grams = [end[-1:], end[-2:], end] if len(end) == 3 else [end[-1:], end]
        get = self.row.get
        return tuple(r for g in grams if g != " " and (r := get(g)) is not None)

    # ---- the seeded trials, all texts in lockstep --------------------------------------------

    def _words(self, upto: int) -> np.ndarray:
        """The first `upto` (or more) 32-bit outputs of the Mersenne Twister langdetect seeds for
        every text (random.Random().seed(DetectorFactory.seed)): one stream shared by all texts."""
        if len(self._stream) < upto:
            more = max(upto - len(self._stream), 1 << 15)
            words = np.frombuffer(self._mt.getrandbits(32 * more).to_bytes(4 * more, "little"), dtype="<u4")
            self._stream = np.concatenate([self._stream, words.astype(np.int64)])
        return self._stream

    def _gauss(self, j: int, pointer: np.ndarray, spare: list) -> float:
        """random.gauss(0.0, 1.0) of text j's generator: two random() (53 bits from two words
        each) give a pair; the second value is kept for the next call, as Random does."""
        z = spare[j]
        spare[j] = None
        if z is None:
            w = self._words(int(pointer[j]) + 4)[pointer[j]:pointer[j] + 4].tolist()
            r1 = ((w[0] >> 5) * 67108864.0 + (w[1] >> 6)) * (1.0 / 9007199254740992.0)
            r2 = ((w[2] >> 5) * 67108864.0 + (w[3] >> 6)) * (1.0 / 9007199254740992.0)
            x2pi = r1 * _TWOPI
            g2rad = math.sqrt(-2.0 * math.log(1.0 - r2))
            z = math.cos(x2pi) * g2rad
            spare[j] = math.sin(x2pi) * g2rad
            pointer[j] += 4
        return 0.0 + z * 1.0

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
        sizes = np.array([len(grams[i]) for i in live], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # each text's n-gram rows, concatenated
        flat = np.fromiter(chain.from_iterable(grams[i] for i in live), dtype=np.int64, count=int(sizes.sum()))
        shift = 32 - np.array([int(n).bit_length() for n in sizes.tolist()], dtype=np.int64)
        pointer = np.zeros(m, dtype=np.int64)  # next unread word of each text's generator
        spare: list = [None] * m  # Random.gauss_next
        trial = np.zeros(m, dtype=np.int64)
        done = np.zeros(m, dtype=np.int64)  # draws made in the current trial (langdetect's i + 1)
        weight = np.zeros(m)
        langprob = np.zeros((m, n_lang))
        prob = np.full((m, n_lang), 1.0 / n_lang)

        def start_trial(j: int) -> None:
            prob[j] = 1.0 / n_lang
            weight[j] = (Detector.ALPHA_DEFAULT + self._gauss(j, pointer, spare) * Detector.ALPHA_WIDTH) \
                / Detector.BASE_FREQ
            done[j] = 0

        # a fixed number of texts in flight: one that finishes its 7 trials makes room for the next,
        # so a few slowly converging texts do not leave the batch almost empty
        width = min(m, SLOTS)
        for j in range(width):
            start_trial(j)
        active, queued = np.arange(width), width
        while len(active):
            # each text draws up to its next convergence check (i % 5 == 0): 1 draw at i = 0, then 5
            first = done[active] == 0
            k = 1 if first.all() else 5
            count = np.where(first, 1, k)
            # random.choice(grams): getrandbits(bit_length(n)) = word >> (32 - bits), redrawn while >= n
            span = 16
            while True:
                at = pointer[active, None] + np.arange(span)
                candidate = self._words(int(at.max()) + 1)[at] >> shift[active, None]
                accepted = candidate < sizes[active, None]
                rank = np.cumsum(accepted, axis=1)
                if (rank[:, -1] >= count).all():
                    break
                span *= 2
            take = accepted & (rank <= count[:, None])
            rows, cols = np.nonzero(take)
            picks = np.zeros((len(active), k), dtype=np.int64)
            picks[rows, rank[rows, cols] - 1] = flat[offsets[active[rows]] + candidate[rows, cols]]
            pointer[active] += np.argmax(rank >= count[:, None], axis=1) + 1
            factors = self.table[picks]
            factors += weight[active, None, None]  # (IEEE addition commutes: langdetect's weight + prob)
            if k > 1 and first.any():  # texts at their first draw (i = 0) have no draws 2..5: x * 1.0 == x
                factors[first, 1:] = 1.0
            p = prob[active]
            for s in range(k):  # sequential products, as langdetect multiplies draw by draw
                p *= factors[:, s]
            p /= _row_sums(p)[:, None]
            prob[active] = p
            done[active] += count
            finished = (p.max(axis=1) > Detector.CONV_THRESHOLD) | (done[active] - 1 >= Detector.ITERATION_LIMIT)
            ended = active[finished]  # texts at the end of a trial
            if len(ended):
                langprob[ended] += prob[ended] / 7
                trial[ended] += 1
                for j in ended[trial[ended] < 7].tolist():
                    start_trial(j)
            active = active[trial[active] < 7]
            if queued < m and len(active) < width:
                new = np.arange(queued, min(m, queued + width - len(active)))
                for j in new.tolist():
                    start_trial(j)
                active, queued = np.concatenate([active, new]), queued + len(new)
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
