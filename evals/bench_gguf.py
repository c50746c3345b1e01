"""Bench: a GGUF model's activations at each analysed layer vs a plain forward pass to that layer.

    .venv/bin/python evals/bench_gguf.py [--model gemma-3-270m] [--docs 64] [--seq-len 64] [--threads 2]

The model is what `autointerp demo --model gemma-3-270m` analyses (Gemma-3-270M from its GGUF,
converted once into the cache; the first run also times that conversion). All timings run in
this one process over the same Debian Reference documents:

  forward to L     the decoder layers 0..L alone (no LM head) on batches tokenised beforehand:
                   the least any activation pass to layer L can cost
  activations L    autointerp.lm.activations.iter_activations(layer=L): tokenise, pad, run until
                   the hook on layer L stops the pass
  activations all  iter_activations over the demo's layers at once (one pass, stopped after the
                   highest), against the forward pass to the highest

and prints tokens/s of each (the fastest of --repeats) with the ratio activations / forward (1.0
is no overhead).
"""

from __future__ import annotations

import argparse
import time

import torch

from autointerp.demo import default_layers
from autointerp.errors import UserError
from autointerp.lm.activations import (
    iter_activations,
    load_lm,
    num_layers,
    pad_batch,
)
from autointerp.lm.corpus import load_corpus


def encoded_batches(tokenizer, texts: list[str], batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pad_batch(tokenizer, texts[start:start + batch_size], seq_len) for start in range(0, len(texts), batch_size)]


def forward_to(model, batches, layer: int) -> float:
    """Seconds for the decoder layers 0..layer over the batches: the base model with its layer
    list cut after `layer` (no LM head, no hooks)."""
    base = model.get_decoder()
    every_layer = base.layers
    base.layers = torch.nn.ModuleList(list(every_layer)[:layer + 1])
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in batches:
                base(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - start
    finally:
        base.layers = every_layer


def activations_at(model, tokenizer, texts, layers, batch_size: int, seq_len: int) -> float:
    start = time.perf_counter()
    for _ in iter_activations(model, tokenizer, texts, layers, batch_size=batch_size, max_tokens=seq_len):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="Each timing is the fastest of this many.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        model, tokenizer = load_lm(args.model)
        load_seconds = time.perf_counter() - start
    except (UserError, ImportError) as exc:  # the gemma extra not installed: say so
        print(f"skipped: {args.model} does not load here ({str(exc).splitlines()[0]})")
        return
    texts = [d.text for d in load_corpus("debian-reference", limit=args.docs)]
    batches = encoded_batches(tokenizer, texts, args.batch_size, args.seq_len)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    layers = default_layers(num_layers(model))
    print(f"{args.model}: loaded in {load_seconds:.1f} s; {len(texts)} documents, {tokens} tokens "
          f"(<= {args.seq_len} each), batch {args.batch_size}, {args.threads} threads; layers {layers}")
    activations_at(model, tokenizer, texts[:args.batch_size], layers[:1], args.batch_size, args.seq_len)  # warm-up
    print(f"{'layer':>8} {'forward tok/s':>14} {'activations tok/s':>18} {'ratio':>6}")
    for name, wanted in [*((str(layer), [layer]) for layer in layers), ("all", layers)]:
        forward = min(forward_to(model, batches, max(wanted)) for _ in range(args.repeats))
        acts = min(activations_at(model, tokenizer, texts, wanted, args.batch_size, args.seq_len)
                   for _ in range(args.repeats))
        print(f"{name:>8} {tokens / forward:>14,.0f} {tokens / acts:>18,.0f} {acts / forward:>6.2f}x")


if __name__ == "__main__":
    main()
