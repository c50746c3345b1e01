"""JSONL files, plain or compressed: how every stage reads and writes its lines.

`.gz` (gzip) or `.zst` (zstandard) by the name when writing, by the first bytes when reading
(so every reader takes every form). Records are stored as `records.jsonl.zst`: the same JSONL
bytes, so the exchange format is exact by construction (`zstd -d` gives the plain file), at
~1/8-1/20 of the bytes, since contexts repeat across a SAE's latents and zstd's long-distance
window finds them.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

from autointerp.errors import UserError
from autointerp.schema import Key

T = TypeVar("T")
OnError = Literal["skip", "fail"]


GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 3
ZSTD_WINDOW_LOG = 27  # 128 MiB: zstd's default decoding limit, so `zstd -d` reads it without flags


def _open_bytes(path: Path):
    """A binary read handle on a plain, gzip or zstd file, told by its first bytes."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    if magic == ZSTD_MAGIC:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _open_text(path: Path, mode: str, suffix: str | None = None):
    """A text handle on a plain, gzip or zstd JSONL file: by its first bytes when reading (any
    name reads), by `suffix` (default: the path's; .gz, .zst) when writing."""
    if mode == "r":
        return io.TextIOWrapper(_open_bytes(path), encoding="utf-8")
    suffix = path.suffix if suffix is None else suffix
    if suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    if suffix == ".zst":
        import zstandard

        # long-distance matching over a 128 MiB window: a context repeated by many latents is
        # stored about once
        params = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL, window_log=ZSTD_WINDOW_LOG, enable_ldm=True, write_checksum=True, threads=-1)
        writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(open(path, mode + "b"),
                                                                                  closefd=True)
        return io.TextIOWrapper(writer, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def iter_lines(path: str | Path, binary: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, line) of a JSONL(.gz/.zst) file, blank lines skipped, streamed; the lines as
    bytes with binary=True (undecoded: ~4x faster to read where only a few lines are parsed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".pt", ".pkl", ".pickle", ".bin"):
        raise UserError(f"{path}: expected a JSONL file, got a pickle/binary file")
    try:
        with (_open_bytes(path) if binary else _open_text(path, "r")) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, line
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise UserError(f"{path}: not a UTF-8 JSONL file ({exc})") from None
    except Exception as exc:  # zstandard.ZstdError: a cut-off or corrupt .zst file
        if type(exc).__name__ != "ZstdError":
            raise
        raise UserError(f"{path}: damaged zstd file ({exc})") from None


def iter_jsonl(path: str | Path, parse: Callable[[dict[str, Any]], T], on_error: OnError = "fail",
               warn: Callable[[str], None] | None = None,
               fail_hint: str = "use --on-error skip to go on") -> Iterator[T]:
    """Yield parsed objects from a JSONL(.gz/.zst) file, one line at a time.

    A malformed line is reported as `file:line: reason`; with on_error="skip" it is skipped
    (passed to `warn`) and reading goes on, with "fail" it raises UserError (ending with
    `fail_hint`, for commands that offer a way on).
    """
    for lineno, line in iter_lines(path):
        try:
            yield parse(json.loads(line))
        except UserError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            message = f"{path}:{lineno}: malformed line ({type(exc).__name__}: {exc})"
            if on_error == "fail":
                raise UserError(f"{message}; {fail_hint}" if fail_hint else message) from None
            if warn:
                warn(message)


def to_json_line(item: Any) -> str:
    """One JSONL line (with its newline) of a dataclass with to_dict, a dict, or an already
    encoded line (a str is written as it is)."""
    if isinstance(item, str):
        return item if item.endswith("\n") else item + "\n"
    return json.dumps(item.to_dict() if hasattr(item, "to_dict") else item, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, items: Iterable[Any]) -> int:
    """Write items (see to_json_line), streamed, atomically (a temp file, then rename); compressed
    when the name ends in .gz or .zst. Returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with _open_text(tmp, "w", suffix=path.suffix) as fh:
            for item in items:
                fh.write(to_json_line(item))
                n += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return n


def read_finished(path: str | Path, parse: Callable[[dict[str, Any]], T]) -> dict[Key, T]:
    """The per-latent lines a stage already appended (by .key), to resume after them.

    A line cut off by a crash is dropped and the file rewritten without it, so the next append
    starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return {}
    done: dict[Key, T] = {}
    raw = path.read_text(encoding="utf-8")
    broken = bool(raw) and not raw.endswith("\n")
    for line in raw.splitlines():
        try:
            row = parse(json.loads(line))
        except (ValueError, TypeError, KeyError):
            broken = True
            continue
        done[row.key] = row
    if broken:
        write_jsonl(path, done.values())
    return done


class JsonlAppender:
    """Append one JSON line at a time and flush, so a crash loses only in-flight work."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, item: Any) -> None:
        self._fh.write(json.dumps(item.to_dict() if hasattr(item, "to_dict") else item, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
