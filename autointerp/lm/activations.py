"""Stream one decoder layer's residual-stream activations from any Hugging Face causal LM.

Layer L means the output of decoder layer L (0-based), i.e. hidden_states[L + 1] of a
forward pass with output_hidden_states=True (except for the last layer, where Hugging Face
applies the final norm to hidden_states[-1]; the hook here always gives the raw layer
output). A forward hook captures the output and stops the forward pass right there, so the
layers above L cost nothing. Activations are yielded batch by batch and never accumulated:
memory stays bounded however large the corpus.

    autointerp activations --model runs/demo/lm/step-600 --layer 1 --corpus debian-reference
    autointerp activations --model EleutherAI/pythia-70m --revision step1000 --layer 3 --out acts/

With --out, OUT/shard-NNNNN.safetensors holds one batch each (acts [B,T,d] float32,
input_ids [B,T], mask [B,T], doc_ids [B]) and OUT/meta.json the settings; a rerun with the
same settings skips the shards already written.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import typer
from rich.console import Console

from autointerp import options as O
from autointerp.errors import UserError
from autointerp.lm.corpus import Document, load_corpus
from autointerp.progress import progress_bar

# Where common architectures keep their decoder blocks (attribute paths from the model root).
_LAYER_PATHS = ("model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers",
                "transformer.blocks", "model.transformer.blocks", "transformer.layers")
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.safetensors.index.json", "*.bin.index.json")


@dataclass
class ActivationBatch:
    acts: torch.Tensor        # [B, T, d] float32, on CPU: the (first) layer asked for
    input_ids: torch.Tensor   # [B, T] long; right-padded
    mask: torch.Tensor        # [B, T] bool: True at real text tokens (not padding, not BOS/special)
    doc_ids: list[int]
    start: int = 0            # position of the batch's first document in the stream
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # every layer asked for -> [B, T, d]


# ---- model loading and introspection -----------------------------------------------------

def load_lm(model: str, revision: str | None = None, device: str = "cpu"):
    """(model, tokenizer) from a local checkpoint folder, a hub id, a .gguf file or a short name
    (autointerp.lm.gguf: a GGUF is converted once into a cached folder); eval mode, float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autointerp.lm.gguf import resolve_lm

    model = resolve_lm(model)
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {model} is a file; give the checkpoint folder (config.json + weights)")
        if not any(any(path.glob(p)) for p in _WEIGHT_FILES):
            steps = sorted(p.name for p in path.glob("step-*") if p.is_dir())
            hint = f"; it holds checkpoints {', '.join(steps)}: give one of them" if steps else ""
            raise UserError(f"model path {model} has no weights (no *.safetensors or *.bin files){hint}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for but no CUDA GPU is available; use --device cpu")
    where = f"{model}" + (f" (revision {revision})" if revision else "")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = torch.float32 if device == "cpu" else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        lm = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {where}: {first_line}") from exc
    return lm.to(device).eval(), tokenizer


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder blocks, found by known attribute paths or by its length."""
    for dotted in _LAYER_PATHS:
        obj = model
        for attr in dotted.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and (n is None or len(m) == n)]
    if not lists:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(lists, key=len)


def num_layers(model) -> int:
    return len(decoder_layers(model))


def check_layer(model, layer: int) -> None:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise UserError(f"layer {layer} out of range: the model has {n} decoder layers (0..{n - 1})")


def d_model(model) -> int:
    return model.get_input_embeddings().embedding_dim


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Readable text of each token, so that "".join(strings) == tokenizer.decode(ids).

    A character split over several byte-level tokens belongs to the token that completes
    it; a token holding only the leading bytes of a character reads as "". Decoding
    prefixes (not single tokens) also keeps SentencePiece's leading spaces right.
    """
    ids = [int(i) for i in ids]
    prefix_ids = [ids[:n] for n in range(1, len(ids) + 1)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust decoder
    if backend is not None:  # transformers' decode walks every id of every prefix in Python first:
        prefixes = backend.decode_batch(prefix_ids, skip_special_tokens=False)  # 2/3 of a GPU collect
    else:
        prefixes = tokenizer.batch_decode(prefix_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    out, done = [], ""
    for n, text in enumerate(prefixes):
        stable = text if n == len(ids) - 1 else text.rstrip("\ufffd")  # drop a half-decoded character
        if not stable.startswith(done):  # the decoder rewrote earlier text: fall back to this token alone
            out.append(tokenizer.decode([ids[n]], skip_special_tokens=False))
            done = stable
            continue
        out.append(stable[len(done):])
        done = stable
    return out


# ---- extraction --------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the hook once layer L has run: the layers above are not needed."""


def _doc_text_and_id(doc: Document | str, index: int) -> tuple[str, int]:
    return (doc.text, doc.doc_id) if isinstance(doc, Document) else (str(doc), index)


def pad_batch(tokenizer, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention mask as bool) of the first `max_tokens` tokens of each text, right-padded
    with the pad token (else EOS, else 0)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    width = max(len(e) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, e in enumerate(encoded):
        input_ids[row, :len(e)] = torch.tensor(e, dtype=torch.long)
        attention[row, :len(e)] = True
    return input_ids, attention


def iter_activations(model, tokenizer, docs: Iterable[Document | str], layer: int | Sequence[int], batch_size: int = 32,
                     max_tokens: int = 64, device: str | torch.device | None = None,
                     shard: tuple[int, int] | None = None) -> Iterator[ActivationBatch]:
    """Layer `layer`'s output for the first `max_tokens` tokens (BOS included) of each document;
    with several layers, all of them from one forward pass (batch.by_layer), stopped after the
    highest.

    shard=(rank, world): only the batches b with b % world == rank run (the model sees ~1/world
    of the tokens; see autointerp.distributed)."""
    wanted = sorted({layer} if isinstance(layer, int) else set(layer))
    if not wanted:
        raise UserError("no layer asked for")
    blocks = decoder_layers(model)
    for one in wanted:
        check_layer(model, one)
    if batch_size < 1 or max_tokens < 1:
        raise UserError(f"batch size and max tokens must be positive (got {batch_size}, {max_tokens})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == wanted[-1]:
                raise _StopForward
        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in wanted]
    first = wanted[0] if isinstance(layer, int) else (list(layer)[0])
    try:
        stream = iter(enumerate(docs))
        for index in itertools.count():
            chunk = list(itertools.islice(stream, batch_size))
            if not chunk:
                break
            if shard is not None and index % shard[1] != shard[0]:
                continue
            texts, doc_ids = zip(*(_doc_text_and_id(d, i) for i, d in chunk))
            input_ids, attention = pad_batch(tokenizer, texts, max_tokens)
            captured.clear()
            with torch.inference_mode():
                try:
                    model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
                except _StopForward:
                    pass
            if len(captured) != len(wanted):
                raise RuntimeError(f"the hooks on layers {wanted} did not all run")
            by_layer = {i: captured[i].float().cpu() for i in wanted}
            mask = attention & ~torch.isin(input_ids, special)
            yield ActivationBatch(acts=by_layer[first], input_ids=input_ids, mask=mask, doc_ids=list(doc_ids),
                                  start=chunk[0][0], by_layer=by_layer)
    finally:
        for handle in handles:
            handle.remove()


# ---- shards on disk ----------------------------------------------------------------------

def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.safetensors"


def save_shard(path: Path, batch: ActivationBatch) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({"acts": batch.acts.contiguous(), "input_ids": batch.input_ids, "mask": batch.mask,
               "doc_ids": torch.tensor(batch.doc_ids, dtype=torch.long)}, str(tmp))
    tmp.replace(path)


def load_shard(path: str | Path) -> ActivationBatch:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return ActivationBatch(acts=t["acts"], input_ids=t["input_ids"], mask=t["mask"].bool(),
                           doc_ids=t["doc_ids"].tolist())


def iter_shards(directory: str | Path) -> Iterator[ActivationBatch]:
    """The batches written by `autointerp activations --out DIR`, in order, one at a time."""
    paths = sorted(Path(directory).glob("shard-*.safetensors"))
    if not paths:
        raise UserError(f"no activation shards (shard-*.safetensors) in {directory}")
    for path in paths:
        yield load_shard(path)


# ---- CLI ---------------------------------------------------------------------------------

def cli(
    model: str = O.model_option("", required=True),
    layer: int = typer.Option(..., "--layer", min=0, help="Decoder layer (0-based) whose output is read."),
    revision: str = O.revision_option("E.g. Pythia's step1000."),
    corpus: str = O.corpus_option(),
    n_docs: int = O.docs_option(),
    seq_len: int = typer.Option(64, "--seq-len", min=1, help="Tokens read from the start of each document (BOS included)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents (sequences) per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    out: Path = typer.Option(None, "--out", metavar="DIR", help="Write safetensors shards (acts, input_ids, mask, doc_ids) here."),
) -> None:
    """Extract one layer's residual stream over a corpus, streaming; print a summary (and write shards)."""
    docs = load_corpus(corpus, limit=n_docs)
    lm, tokenizer = load_lm(model, revision=revision, device=device)
    check_layer(lm, layer)
    # the keys of shards written before the options were renamed (--limit, --max-tokens), so they resume
    settings = {"model": model, "revision": revision, "layer": layer, "corpus": corpus, "limit": n_docs,
                "max_tokens": seq_len, "batch_size": batch_size}
    done_shards: set[int] = set()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta_path = out / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old.get("settings") != settings:
                raise UserError(f"{out} holds activations made with other settings; give a new --out")
            done_shards = {i for i in range(-(-len(docs) // batch_size)) if _shard_path(out, i).exists()}
        meta_path.write_text(json.dumps({"settings": settings, "complete": False}, indent=2))

    n_tokens, norm_sum, computed_tokens, t0 = 0, 0.0, 0, time.time()
    n_layers, width = num_layers(lm), d_model(lm)
    console = Console(stderr=True)
    with progress_bar("docs", eta=True, console=console) as progress:
        task = progress.add_task("activations", total=len(docs))
        for index, start in enumerate(range(0, len(docs), batch_size)):
            if index in done_shards:  # written by an earlier run: only read back for the summary
                batch = load_shard(_shard_path(out, index))
            else:
                chunk = docs[start:start + batch_size]
                (batch,) = iter_activations(lm, tokenizer, chunk, layer, batch_size, seq_len, device)
                computed_tokens += int(batch.mask.sum())
                if out is not None:
                    save_shard(_shard_path(out, index), batch)
            real = batch.acts[batch.mask]
            n_tokens += len(real)
            norm_sum += float(real.norm(dim=-1).sum())
            progress.update(task, advance=len(batch.doc_ids))
    seconds = time.time() - t0
    summary = {"docs": len(docs), "tokens": n_tokens, "layer": layer, "layers": n_layers, "d_model": width,
               "mean_norm": round(norm_sum / max(1, n_tokens), 4),
               "tokens_per_s": round(computed_tokens / max(seconds, 1e-9), 1), "seconds": round(seconds, 2)}
    if out is not None:
        (out / "meta.json").write_text(json.dumps({"settings": settings, "complete": True, **summary}, indent=2))
    Console().print(" ".join(f"{k}={v}" for k, v in summary.items()), highlight=False, soft_wrap=True)
