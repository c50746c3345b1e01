"""Whole-SAE scale: compact records round-trip exactly, langdetect runs once per distinct text
with langdetect's own answers, and streamed statistical labels equal the in-memory ones."""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from autointerp.run import Site
from typer.testing import CliRunner

from autointerp.labels import decision as granularity
from autointerp.labels import language
from autointerp import run as runlib
from autointerp.labels import statlabels
from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.labels.langdetect_batch import BatchDetector
from autointerp.jsonl import iter_lines, to_json_line, write_jsonl
from autointerp.records.read import read_records, stream_records
from autointerp.schema import FeatureRecord
from autointerp.labels.statlabels import write_stat_labels

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
needs_dev = pytest.mark.skipif(not DEV.exists(), reason=f"shared dev file {DEV} is absent")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
from synthetic_sae import SyntheticSAE, window_pool  # noqa: E402

TEXTS = ["The kernel module is loaded at boot time by the init system.",
         "Debian パッケージは apt コマンドで管理します。", "設定ファイルを編集してください。",
         "東京都", "123 456 !!", "", "   ", "http://example.org/x mail@example.org",
         "L'utilisateur doit redémarrer le serveur après la mise à jour.", "ȘȚ și ț — Ünïcödé", "ABC DEF GHI"]


def synthetic(n: int) -> list[FeatureRecord]:
    texts = TEXTS * 3 + [f"Section {i}: the package {w} provides a daemon と設定 {i * 7}"
                         for i, w in enumerate(["apt", "dpkg", "systemd", "ssh", "xorg", "grub"] * 5)]
    return list(SyntheticSAE(window_pool(texts, width=24, stride=8, min_tokens=4), n, seed=1).records())


def dev_records(step: int = 1) -> list[FeatureRecord]:
    return read_records(DEV)[::step]


# ---- langdetect: the batch detector is langdetect, the cache changes nothing ----------------

def _reference_probabilities(text: str):
    from langdetect import detector_factory
    from langdetect.lang_detect_exception import LangDetectException

    detector_factory.init_factory()
    detector = detector_factory._factory.create()
    detector.append(text)
    try:
        detector._detect_block()
    except LangDetectException:
        return None
    return detector.langprob


def test_batch_detector_is_bit_identical_to_langdetect():
    texts = TEXTS + [language.context_text(c)
                     for r in synthetic(40) for c in r.contexts[:3]]
    if DEV.exists():  # every 12th distinct context of the dev file (en, ja, mixed, code)
        texts += list(dict.fromkeys(t for r in dev_records() for t in language.context_texts(r)))[::12]
    detector = BatchDetector()
    got = detector.probabilities(texts)
    answers = detector.detect(texts)  # (trials stop once the answer is settled)
    for text, probs, answer in zip(texts, got, answers):
        want = _reference_probabilities(text)
        assert (probs is None) == (want is None), text
        if want is not None:
            assert list(probs) == want, text  # exact floats, not approximately
        best = max(range(len(want)), key=want.__getitem__) if want and max(want) > 0.1 else None
        assert answer == ("unknown" if best is None else detector.langlist[best]), text
    assert BatchDetector().detect(["", "Bonjour tout le monde, comment allez-vous ?"]) == ["unknown", "fr"]


def test_batch_ngrams_are_langdetects_own():
    from langdetect import detector_factory

    texts = TEXTS + ["ABC def GHi jKL", "A", "AB", "Ab", "aB c", "I  AM  HERE", "x\ud800y", "日本語 テキスト ABCD",
                     "𝔘𝔫𝔦 émoji 😀 ok", "Ｆｕｌｌ ｗｉｄｔｈ", "a,b;c. d", " lead and trail ", "\u3000全角 スペース",
                     "ạầẩẫậắ hello", "1 2 3 44 555", "x" * 10_050 + " y"]
    texts += [language.context_text(c) for r in synthetic(20) for c in r.contexts[:5]]
    if DEV.exists():
        texts += list(dict.fromkeys(t for r in dev_records(5) for t in language.context_texts(r)))
    detector_factory.init_factory()
    factory = detector_factory._factory
    row = {w: i for i, w in enumerate(factory.word_lang_prob_map)}
    detector = BatchDetector()
    for size in (1, 7, len(texts)):  # batches of any size give each text its own rows
        rows = []
        for i in range(0, len(texts), size):
            flat, sizes = detector.ngram_rows(texts[i:i + size])
            rows += np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []
        for text, got in zip(texts, rows):
            reference = factory.create()
            reference.append(text)
            reference.cleaning_text()
            assert got.tolist() == [row[g] for g in reference._extract_ngrams()], text[:80]


def test_non_latin_chars_are_those_langdetect_weighs_latin_letters_against():
    from langdetect.utils.unicode_block import unicode_block

    from autointerp.labels.langdetect_batch import NON_LATIN_FROM

    # Detector.cleaning_text's own test, as langdetect writes it
    for cp in [*range(0x3000), *range(0x3000, 0x10000, 7), 0x1f600, 0x20000, 0x10ffff]:
        ch = chr(cp)
        assert (cp >= NON_LATIN_FROM) == (ch >= "\u0300" and unicode_block(ch) != "Latin Extended Additional"), hex(cp)
    # a Vietnamese text (Latin Extended Additional) loses its ASCII letters as in langdetect
    text = "ạầẩẫậắằẳẵặẹẻẽế ỉịọỏốồổỗộớờởỡợ ụủứừửữựỳỵỷỹ hello"
    assert BatchDetector().probabilities([text])[0].tolist() == _reference_probabilities(text)


@needs_dev
def test_cached_profiles_equal_uncached_langdetect(monkeypatch):
    records = dev_records(7)
    language.LANGUAGE_CACHE.clear()
    cached = [language.profile(r) for r in records]
    calls = []

    def one_call_a_text(texts):  # the uncached path: langdetect itself on every context
        texts = list(texts)
        calls.extend(texts)
        return [language.langdetect_language(t) for t in texts]

    monkeypatch.setattr(language, "detect_languages", one_call_a_text)
    uncached = [language.profile(r) for r in records]
    assert cached == uncached
    assert len(calls) == sum(len(language.context_texts(r)) for r in records)


def test_each_distinct_text_is_detected_once(monkeypatch):
    records = synthetic(30)
    language.LANGUAGE_CACHE.clear()
    seen = []
    detector = language.batch_detector()
    monkeypatch.setattr(detector, "detect", lambda texts: seen.extend(texts) or ["xx"] * len(texts))
    language.detect_records(records)
    for r in records:
        language.profile(r)
    texts = [t for r in records for t in language.context_texts(r)]
    asked = {t for t in texts if language.script_language(t) is None}  # the rest: settled by their script
    assert sorted(seen) == sorted(asked) and len(texts) > len(set(texts))  # contexts repeat; one call each
    assert 0 < len(asked) < len(set(texts))
    language.LANGUAGE_CACHE.clear()


# ---- compact records -------------------------------------------------------------------------

def test_compact_records_round_trip_to_jsonl_exactly(tmp_path):
    records = synthetic(60) + (dev_records(10) if DEV.exists() else [])
    plain, compact, back = tmp_path / "r.jsonl", tmp_path / "r.jsonl.zst", tmp_path / "back.jsonl"
    write_jsonl(plain, records)
    write_jsonl(compact, records)
    assert compact.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert compact.stat().st_size * 4 <= plain.stat().st_size
    result = CliRunner().invoke(app, ["records", "import", str(compact), "--out", str(back)])
    assert result.exit_code == 0, result.output
    assert back.read_bytes() == plain.read_bytes()  # byte for byte
    assert [r.to_dict() for r in stream_records(compact)] == [r.to_dict() for r in records]
    # every reader takes every form, whatever the name says
    misnamed = tmp_path / "records.jsonl"
    shutil.copy(compact, misnamed)
    assert [r.key for r in read_records(misnamed)] == [r.key for r in records]
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert [line for _, line in iter_lines(gz)] == plain.read_text(encoding="utf-8").splitlines(keepends=True)


@needs_dev
def test_dev_file_reads_as_it_is_and_converts_both_ways(tmp_path):
    compact, plain = tmp_path / "dev.jsonl.zst", tmp_path / "dev.jsonl"
    runner = CliRunner()
    assert runner.invoke(app, ["records", "import", str(DEV), "--out", str(compact)]).exit_code == 0
    assert runner.invoke(app, ["records", "import", str(compact), "--out", str(plain)]).exit_code == 0
    assert plain.read_bytes() == "".join(to_json_line(r) for r in read_records(DEV)).encode()


def test_run_directory_finds_compact_or_plain_records(tmp_path):
    step = tmp_path / "step-5"
    step.mkdir()
    assert runlib.records_file(step).name == "records.jsonl.zst"  # where collect writes
    write_jsonl(step / "records.jsonl", synthetic(3))
    assert runlib.records_file(step).name == "records.jsonl"  # an older run's plain file still reads


# ---- streamed statistical labels ----------------------------------------------------------------

@pytest.mark.parametrize("workers,head", [(1, 0), (2, 0), (2, 1), (2, statlabels.HEAD)])
def test_streamed_labels_equal_in_memory_labels(tmp_path, monkeypatch, workers, head):
    records = synthetic(150) + (dev_records(6) if DEV.exists() else [])
    path = tmp_path / "records.jsonl.zst"
    write_jsonl(path, records)
    monkeypatch.setattr(statlabels, "HEAD", head)  # chunks labelled before the workers start
    counts = write_stat_labels(path, tmp_path / "labels.jsonl", workers=workers)
    language.LANGUAGE_CACHE.clear()
    in_memory = [to_json_line(label) for label in granularity.build_labels(read_records(path))
                 if label.language_profile.get("n_contexts")]
    assert counts.labelled + counts.dead == len(records) and counts.labelled == len(in_memory)
    assert (tmp_path / "labels.jsonl").read_text(encoding="utf-8") == "".join(in_memory)
    # and iter_labels really streams: it pulls records as it yields labels, a chunk at a time
    pulled = []

    def source():
        for r in records:
            pulled.append(r.key)
            yield r

    stream = granularity.iter_labels(source(), chunk=16)
    first = next(stream)
    assert first.key == records[0].key and len(pulled) == 16


@pytest.mark.parametrize("workers,head", [(1, 0), (2, 1), (2, statlabels.HEAD)])
def test_a_malformed_line_stops_the_labels_with_its_place_and_writes_nothing(tmp_path, monkeypatch, workers, head):
    path = tmp_path / "records.jsonl"
    lines = [to_json_line(r) for r in synthetic(120)]
    lines[70] = '{"feature": 70, "contexts": [ broken\n'  # in the third chunk of CHUNK = 32 lines
    path.write_text("".join(lines), encoding="utf-8")
    monkeypatch.setattr(statlabels, "HEAD", head)  # head 1: a worker meets it
    with pytest.raises(UserError, match=r"records.jsonl:71: malformed line"):
        write_stat_labels(path, tmp_path / "labels.jsonl", workers=workers)
    assert not (tmp_path / "labels.jsonl").exists()


def test_report_streams_records_and_keeps_only_the_shown_ones(tmp_path):
    from autointerp.report.read import read_step
    from autointerp.report.views import step_summary

    records = synthetic(40)
    step = tmp_path / "step-600"
    write_jsonl(step / "records.jsonl.zst", records)
    labelled = [records[7], records[3], records[30]]
    write_jsonl(step / "labels.jsonl", granularity.build_labels(labelled))
    everything = read_step(tmp_path, Site(600))  # max_records None: every record kept, as before
    data = read_step(tmp_path, Site(600), max_records=5, max_contexts=2)
    assert data.n_records == everything.n_records == len(everything.records) == 40
    # the labelled ones first, then the lowest unlabelled feature ids; only the contexts shown
    assert sorted(k.feature for k in data.records) == [0, 1, 3, 7, 30]
    assert all(len(r.contexts) <= 2 and not r.negatives for r in data.records.values())
    assert data.context_counts[records[7].key] == len(records[7].contexts)
    assert step_summary(data, {}) == step_summary(everything, {})
    language.LANGUAGE_CACHE.clear()
    # without labels the page's language shares come from every record's trend, kept or not
    (step / "labels.jsonl").unlink()
    data = read_step(tmp_path, Site(600), max_records=5, max_contexts=2)
    from collections import Counter
    assert step_summary(data, {})["language"] == dict(Counter(language.profile(r)["trend"] for r in records))
    assert len(data.records) == 5


def test_lean_records_read_what_a_label_needs_like_the_general_reader():
    import json

    from autointerp.records.lean import lean_record

    records = synthetic(20) + (dev_records(30) if DEV.exists() else [])
    odd = records[0].to_dict() | {"model": None, "feature": "5"}  # msgspec's strict types refuse these
    odd["contexts"] = [dict(c, levels=[float(v) for v in c["levels"]]) for c in odd["contexts"]]
    lines = [to_json_line(r) for r in records] + [json.dumps(odd)]
    for line in lines:
        general = FeatureRecord.from_dict(json.loads(line))
        lean = lean_record(line)
        assert (lean.key, lean.model, lean.layer, lean.density, lean.max_activation) == \
            (general.key, general.model, general.layer, general.density, general.max_activation)
        assert lean.contexts == general.contexts and not lean.negatives
    with pytest.raises(ValueError):
        lean_record(json.dumps(records[0].to_dict() | {"contexts": [{"tokens": ["a"], "levels": [1, 2]}]}))
