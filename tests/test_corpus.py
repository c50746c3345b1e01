"""Corpus loading: the bilingual Debian Reference default, text/JSONL files, bad input."""

import gzip
import json
from pathlib import Path

import pytest

from autointerp.lm.corpus import DEBIAN_REFERENCE_DIR, Document, load_corpus, split_paragraphs
from autointerp.errors import UserError

needs_debian_reference = pytest.mark.skipif(
    not (DEBIAN_REFERENCE_DIR / "debian-reference.ja.txt.gz").exists(),
    reason="Debian Reference not installed (apt-get install debian-reference-en debian-reference-ja)")


@needs_debian_reference
def test_debian_reference_is_interleaved_half_english_half_japanese():
    docs = load_corpus("debian-reference")
    assert len(docs) > 1000
    assert [d.lang for d in docs[:6]] == ["en", "ja"] * 3
    assert sum(d.lang == "ja" for d in docs) == sum(d.lang == "en" for d in docs)
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    ja = [d for d in docs if d.lang == "ja"]
    # Japanese documents hold Japanese script (a few are code or command output only)
    with_script = sum(any("\u3040" <= c <= "\u9fff" for c in d.text) for d in ja)
    assert with_script > 0.8 * len(ja)
    assert all(len(d.text) >= 100 for d in ja)
    # ASCII-art tables are dropped
    assert not any(line.startswith("|-") for d in docs for line in d.text.splitlines())


@needs_debian_reference
def test_limit_keeps_the_prefix_and_the_balance():
    full = load_corpus("debian-reference")
    some = load_corpus("debian-reference", limit=10)
    assert some == full[:10]
    assert sum(d.lang == "en" for d in some) == 5


def test_split_paragraphs_joins_wrapped_english_with_spaces_and_japanese_without():
    text = "This is a\nwrapped line.\n\nこれは折り返された\n文です。\n\n|a |b |\n|--+--|\n"
    assert split_paragraphs(text) == ["This is a wrapped line.", "これは折り返された文です。"]


def test_text_file_paragraphs_and_one_document_per_line(tmp_path: Path):
    para = tmp_path / "p.txt"
    para.write_text("first para\ngoes on\n\n\nsecond\n")
    assert [d.text for d in load_corpus(str(para))] == ["first para goes on", "second"]
    lines = tmp_path / "l.txt.gz"
    with gzip.open(lines, "wt") as f:
        f.write("one\ntwo\n\u65e5\u672c\n")
    docs = load_corpus(str(lines))
    assert [d.text for d in docs] == ["one", "two", "日本"]
    assert docs[0] == Document(text="one", lang=None, source=str(lines), doc_id=0)


def test_jsonl_keeps_text_and_lang(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(o, ensure_ascii=False) for o in
                              [{"text": "hello", "lang": "en"}, {"text": "  "}, {"text": "こんにちは", "lang": "ja"}]))
    docs = load_corpus(str(path))
    assert [(d.text, d.lang, d.doc_id) for d in docs] == [("hello", "en", 0), ("こんにちは", "ja", 1)]


@pytest.mark.parametrize("content, message", [
    ("", "no documents"),
    ("\n  \n\n", "no documents"),
    ('{"txt": "x"}\n', '"text"'),
    ("not json\n", "not valid JSON"),
])
def test_bad_corpora_are_user_errors(tmp_path: Path, content: str, message: str):
    path = tmp_path / ("c.jsonl" if content.startswith("{") or content.startswith("not") else "c.txt")
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_corpus(str(path))


def test_missing_corpus_path_names_it(tmp_path: Path):
    with pytest.raises(UserError, match="nope.txt.*not found"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_missing_debian_reference_says_how_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setattr("autointerp.lm.corpus.DEBIAN_REFERENCE_DIR", tmp_path)
    with pytest.raises(UserError, match="apt-get install debian-reference-en debian-reference-ja"):
        load_corpus("debian-reference")
