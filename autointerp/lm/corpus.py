"""Text corpora as lists of documents, each tagged with its language where known.

The embedded default is the parallel English/Japanese Debian Reference (Debian packages
debian-reference-en / debian-reference-ja), split into paragraph documents and interleaved
50/50 en/ja, standing in for the paper's 50/50 English/Japanese Wikipedia.

    load_corpus("debian-reference")       the bilingual default
    load_corpus("notes.txt")              blank-line paragraphs (or one document a line)
    load_corpus("docs.jsonl.gz")          one JSON object a line with a "text" (and optional "lang")
    load_corpus("hf:wikitext:train")      a Hugging Face dataset (needs `datasets` and the network)
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from autointerp.errors import UserError

DEBIAN_REFERENCE_DIR = Path("/usr/share/debian-reference")
DEBIAN_REFERENCE_HINT = ("install it with `apt-get install debian-reference-en debian-reference-ja` "
                         "(or `make setup`)")
# Short paragraphs (headings, one-line notes) are merged with the following ones until a
# document holds at least this many characters; Japanese packs ~2x the meaning per character.
MIN_DOC_CHARS = {"en": 200, "ja": 100}

_TOC_LINE = re.compile(r"^\d+(\.\d+)*\.\s")  # "1.2.3. Title": table-of-contents entries
_TABLE_LINE = re.compile(r"^(\||\+-)")       # ASCII-art tables: |cell|cell| and +----+
_CODE_LINE = re.compile(r"^[$#] ")           # shell examples keep their line breaks


@dataclass(frozen=True)
class Document:
    text: str
    lang: str | None
    source: str
    doc_id: int


def _open_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read corpus file {path}: {exc}") from exc


def _join_wrapped(lines: list[str]) -> str:
    """Undo hard wrapping: English lines join with a space, Japanese ones with nothing."""
    out = lines[0]
    for line in lines[1:]:
        if _CODE_LINE.match(line) or _CODE_LINE.match(lines[0]):
            out += "\n" + line
        elif out and out[-1].isascii() and line[0].isascii():
            out += " " + line
        else:
            out += line
    return out


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with wrapping undone; tables and TOC blocks dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if sum(bool(_TABLE_LINE.match(x)) for x in lines) > len(lines) / 2:
            continue
        if len(lines) > 1 and sum(bool(_TOC_LINE.match(x)) for x in lines) > len(lines) / 2:
            continue
        paragraphs.append(_join_wrapped(lines))
    return paragraphs


def merge_short(paragraphs: Iterable[str], min_chars: int) -> list[str]:
    """Group consecutive paragraphs into documents of at least `min_chars` characters."""
    docs, pending = [], []
    for p in paragraphs:
        pending.append(p)
        if sum(len(x) for x in pending) >= min_chars:
            docs.append("\n".join(pending))
            pending = []
    return docs  # a short tail is dropped: too little text to be a document


def _debian_reference_docs(lang: str) -> list[str]:
    path = DEBIAN_REFERENCE_DIR / f"debian-reference.{lang}.txt.gz"
    if not path.exists():
        raise UserError(f"corpus file {path} not found: {DEBIAN_REFERENCE_HINT}")
    return merge_short(split_paragraphs(_open_text(path)), MIN_DOC_CHARS[lang])


def _interleave(en: list[str], ja: list[str]) -> Iterator[tuple[str, str]]:
    """en, ja, en, ja, ...: exactly 50/50, so any prefix (a --docs N) stays balanced."""
    for e, j in zip(en, ja):
        yield e, "en"
        yield j, "ja"


def _text_file_docs(path: Path) -> list[str]:
    text = _open_text(path)
    if re.search(r"\n\s*\n", text):
        return split_paragraphs(text)
    return [line.strip() for line in text.splitlines() if line.strip()]  # one document a line


def _jsonl_docs(path: Path) -> Iterator[tuple[str, str | None]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f"{path}:{n}: expected an object with a string \"text\" field")
                if obj["text"].strip():
                    yield obj["text"], obj.get("lang")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read corpus file {path}: {exc}") from exc


def _hf_docs(spec: str, limit: int | None) -> Iterator[tuple[str, str | None]]:
    name, _, split = spec.removeprefix("hf:").partition(":")
    try:
        import datasets  # optional: only this corpus kind needs it
    except ImportError as exc:
        raise UserError(f"corpus {spec!r} needs the `datasets` package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
        for n, row in enumerate(ds):
            if limit is not None and n >= limit * 4:  # blank rows are skipped; don't stream forever
                break
            text = row.get("text")
            if isinstance(text, str) and text.strip():
                yield text, row.get("lang") or row.get("language")
    except Exception as exc:  # network, unknown name, bad split: all the user's to fix
        raise UserError(f"cannot load Hugging Face dataset {spec!r}: {type(exc).__name__}: {exc}") from exc


def load_corpus(spec: str = "debian-reference", limit: int | None = None) -> list[Document]:
    """Documents of a corpus, in a fixed order; `limit` keeps the first `limit` of them."""
    if spec == "debian-reference":
        pairs: Iterable[tuple[str, str | None]] = _interleave(_debian_reference_docs("en"),
                                                              _debian_reference_docs("ja"))
        source = "debian-reference"
    elif spec.startswith("hf:"):
        pairs, source = _hf_docs(spec, limit), spec
    else:
        path = Path(spec)
        if not path.exists():
            raise UserError(f"corpus {spec!r} not found: give a .txt/.txt.gz/.jsonl/.jsonl.gz path, "
                            "'debian-reference' or 'hf:NAME[:SPLIT]'")
        if path.is_dir():
            raise UserError(f"corpus {spec!r} is a directory; give a .txt/.txt.gz/.jsonl/.jsonl.gz file")
        suffixes = path.name.lower().split(".")[1:]
        source = str(path)
        if "jsonl" in suffixes or "json" in suffixes:
            pairs = _jsonl_docs(path)
        else:
            pairs = ((text, None) for text in _text_file_docs(path))
    docs = []
    for text, lang in pairs:
        if limit is not None and len(docs) >= limit:
            break
        if lang is not None and spec == "debian-reference":
            source_name = f"{source}.{lang}"
        else:
            source_name = source
        docs.append(Document(text=text, lang=lang, source=source_name, doc_id=len(docs)))
    if not docs:
        raise UserError(f"corpus {spec!r} has no documents (empty or only blank text)")
    return docs
