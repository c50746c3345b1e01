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
cleaning, per-character normalisation, n-gram extraction) follows langdetect's code, computed on
the code points of a whole batch at once (ngram_rows). detect() stops a text's trials once its
answer can no longer change (usually after 4 of the 7).
"""

from __future__ import annotations

import gc
import math
import random
import sys
from itertools import chain, compress
from typing import Sequence

import numpy as np
from langdetect import DetectorFactory, detector_factory
from langdetect.detector import Detector
from langdetect.utils.ngram import NGram

UNKNOWN = "unknown"
_TWOPI = 2.0 * math.pi  # random.TWOPI
SLOTS = 512  # texts in flight at once
_DMARKS = frozenset(NGram.DMARK_CLASS)  # the combining marks NGram.normalize_vi acts on
# cleaning_text weighs the Latin letters ('A' <= ch <= 'z') against the chars >= U+0300 "and
# unicode_block(ch) != 'Latin Extended Additional'", but unicode_block returns a number, never
# that name: every char from U+0300 on counts
NON_LATIN_FROM = 0x300


def _row_sums(p: np.ndarray) -> np.ndarray:
    """Each row's sum as langdetect takes it (Python's sum(list)): left to right before Python
    3.12 (np.cumsum is that too), compensated from 3.12 on (then Python's own sum is used)."""
    if sys.version_info < (3, 12):
        return np.cumsum(p, axis=1)[:, -1]
    return np.array([sum(row) for row in p.tolist()])


def _slots(keys: np.ndarray, bits: int) -> np.ndarray:
    """Fibonacci hashing: each key's home slot in a table of 2**bits."""
    return ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)).astype(np.int64)


class _IntTable:
    """A hash table from non-negative int64 keys to int64 values (open addressing, linear
    probing, at most 1/4 full), looked up for a whole array of keys at once."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        self.bits = max(4, (4 * len(keys)).bit_length())
        self.mask = (1 << self.bits) - 1
        self.keys = np.full(1 << self.bits, -1, dtype=np.int64)
        self.values = np.zeros(1 << self.bits, dtype=np.int64)
        slot, todo = _slots(keys, self.bits), np.arange(len(keys))
        while len(todo):  # each round: the first key that wants each free slot takes it; the rest probe on
            want = todo[self.keys[slot[todo]] == -1]
            _, first = np.unique(slot[want], return_index=True)
            won = want[first]
            self.keys[slot[won]], self.values[slot[won]] = keys[won], values[won]
            todo = np.setdiff1d(todo, won, assume_unique=True)
            slot[todo] = (slot[todo] + 1) & self.mask

    def get(self, query: np.ndarray) -> np.ndarray:
        """The value of each key of `query`, -1 where it is not in the table."""
        slot = _slots(query, self.bits)
        found = self.keys[slot]
        out = np.where(found == query, self.values[slot], -1)
        todo = np.flatnonzero((found != query) & (found != -1))  # a slot held by another key: look on
        at = slot[todo]
        while len(todo):
            at = (at + 1) & self.mask
            found = self.keys[at]
            hit = found == query[todo]
            out[todo[hit]] = self.values[at[hit]]
            going = ~hit & (found != -1)
            todo, at = todo[going], at[going]
        return out


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
            self.table = np.fromiter(chain.from_iterable(words.values()), dtype=np.float64,
                                     count=len(words) * len(self.langlist)).reshape(len(words), len(self.langlist))
            # the profile's n-grams (1 to 3 chars) as integers: their code points, 21 bits each
            lengths = np.array(list(map(len, words)))
            keys, rows = {}, {}
            for n in (1, 2, 3):
                rows[n] = np.flatnonzero(lengths == n)
                points = np.frombuffer("".join(compress(words, lengths == n)).encode("utf-32-le"), dtype="<u4")
                keys[n] = np.zeros(len(rows[n]), dtype=np.int64)
                for column in points.reshape(len(rows[n]), n).astype(np.int64).T:
                    keys[n] = keys[n] << 21 | column
            self._unigrams = np.full(0x110000, -1, dtype=np.int64)  # code point -> its row
            self._unigrams[keys[1]] = rows[1]
            self._bigrams, self._trigrams = _IntTable(keys[2], rows[2]), _IntTable(keys[3], rows[3])
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
        # per code point, filled in for the chars in _seen: NGram.normalize (always one char) and
        # str.isupper() of what it gives
        self._norm = np.arange(0x110000, dtype=np.int32)
        self._upper = np.zeros(0x110000, dtype=bool)
        self._seen: set[str] = set()

    # ---- text -> n-gram rows (Detector.append, cleaning_text, _extract_ngrams) -----------------

    def _read(self, text: str) -> str:
        """What Detector.append keeps of a text, but for its runs of spaces (NGram reads a space
        after a space as nothing, so they change no n-gram): URLs and mail addresses out,
        Vietnamese normalised, the first 10,000 chars."""
        if "://" in text:  # the patterns cannot match otherwise
            text = Detector.URL_RE.sub(" ", text)
        if "@" in text:
            text = Detector.MAIL_RE.sub(" ", text)
        if not _DMARKS.isdisjoint(text):
            text = NGram.normalize_vi(text)
        return text[:10000]

    def ngram_rows(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, sizes): the profile rows of every text's n-grams, in the order langdetect's
        _extract_ngrams lists them, all texts' concatenated, and how many each text has.

        Computed for all the texts at once, on their code points, each after a space (NGram's
        initial state): cleaning_text drops the Latin letters of a text with more than twice as
        many chars at or above U+0300; NGram.normalize maps each char to one char; NGram keeps
        the last 3 chars read and starts again after a space, so the grams after a char depend
        on it and the two before: its 1-gram (not a space), its 2-gram, its 3-gram when the char
        before is no space; none after a space that follows a space, nor after an upper-case
        char that follows another (NGram.capitalword)."""
        if not texts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        joined = "".join(texts)
        if "://" in joined or "@" in joined or not _DMARKS.isdisjoint(joined):
            read = [self._read(t) for t in texts]
        else:  # (the usual case)
            read = [t[:10000] for t in texts]
        stream = "".join(" " + t for t in read)
        for ch in [ch for ch in set(stream) if ch not in self._seen]:
            self._seen.add(ch)
            norm = NGram.normalize(ch)
            self._norm[ord(ch)], self._upper[ord(norm)] = ord(norm), norm.isupper()
        cp = np.frombuffer(stream.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        lengths = np.array([len(t) + 1 for t in read], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        latin = (cp >= 65) & (cp <= 122)  # cleaning_text: 'A' <= ch <= 'z'
        non_latin = np.add.reduceat(cp >= NON_LATIN_FROM, starts)
        cleaned = (non_latin > 0) & (np.add.reduceat(latin, starts) * 2 < non_latin)
        if cleaned.any():
            keep = ~(latin & np.repeat(cleaned, lengths))
            cp = cp[keep]
            lengths = np.add.reduceat(keep, starts)
            starts = np.cumsum(lengths) - lengths
        cp = self._norm[cp].astype(np.int64)
        space, upper = cp == 32, self._upper[cp]
        before = np.concatenate([[32], cp[:-1]])  # the char before (a space before the first)
        space_before = np.concatenate([[True], space[:-1]])
        grams = ~((space & space_before) | (upper & np.concatenate([[False], upper[:-1]])))
        grams[starts] = False  # the initial space is no char read
        two = before << 21 | cp
        three = np.concatenate([[32, 32], cp])[:len(cp)] << 42 | two
        rows = np.stack([np.where(grams & ~space, self._unigrams[cp], -1),
                         np.where(grams, self._bigrams.get(two), -1),
                         np.where(grams & ~space_before, self._trigrams.get(three), -1)], axis=1)
        found = rows >= 0
        per_char = found[:, 0].astype(np.int64) + found[:, 1] + found[:, 2]
        return rows[found], np.add.reduceat(per_char, starts)

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

    def probabilities(self, texts: Sequence[str], settled_early: bool = False) -> list[np.ndarray | None]:
        """langdetect's averaged language probabilities per text (None: no n-gram, langdetect's
        'No features in text' error). settled_early: a text stops once its best language can no
        longer change (see detect); its probabilities are then those of the trials run so far."""
        n_lang = len(self.langlist)
        flat, sizes = self.ngram_rows(texts)  # (texts without n-grams add none to flat)
        live = np.flatnonzero(sizes).tolist()
        out: list[np.ndarray | None] = [None] * len(texts)
        if not live:
            return out
        m = len(live)
        sizes = sizes[live]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # each text's n-gram rows in flat
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
                if settled_early:
                    going = ended[trial[ended] < 7]
                    trial[going[self._settled(langprob[going], trial[going])]] = 7
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

    @staticmethod
    def _settled(langprob: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """Which texts' best language is decided after `trials` of the 7: each trial left adds at
        most 1/7 to a language (its probabilities sum to 1) and never takes any away, so a leader
        ahead of every other language by more than that (and already above PROB_THRESHOLD) stays
        langdetect's answer. (1e-9 covers the rounding of the additions left, ~1e-16 each.)"""
        if langprob.shape[1] < 2 or not len(langprob):
            return np.zeros(len(langprob), dtype=bool)
        top2 = np.partition(langprob, -2, axis=1)[:, -2:]
        return (top2[:, 1] - top2[:, 0] > (7 - trials) / 7 + 1e-9) & (top2[:, 1] > Detector.PROB_THRESHOLD)

    def detect(self, texts: Sequence[str]) -> list[str]:
        """langdetect's best language per text (detect_langs(text)[0].lang), 'unknown' where it has
        none. Usually decided after 4 of langdetect's 7 trials: the rest are not run (_settled)."""
        out = []
        for p in self.probabilities(texts, settled_early=True):
            if p is None or not (p > Detector.PROB_THRESHOLD).any():
                out.append(UNKNOWN)
            else:
                out.append(self.langlist[int(np.argmax(p))])
        return out
