"""Bench: feature-record collection vs a plain forward pass of the same model over the same tokens.

    .venv/bin/python evals/bench_collect.py [--run runs/demo] [--max-docs 2000] [--top-k 50] [--threads 1]

Uses the last checkpoint of RUN (RUN/lm/step-N + RUN/step-N/sae) when present; otherwise a
randomly initialised model of the demo's size (d 128, 4 layers, BPE vocab 8192 trained on the
corpus) and a random TopK SAE (16x, k 32). All three timings run in this one process:

  forward          the whole model (logits included) over the batches collect sees (tokenised once)
  layer + SAE      iter_activations (tokenise, run up to the layer) + SAE encode: the least any
                   collection needs
  collect          records.collect(...) end to end (the above + top-k merge + building records)

and prints collect / forward (the issue's target: <= 1.3x) and collect / (layer + SAE).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from autointerp import run as runlib
from autointerp.lm.activations import iter_activations, load_lm
from autointerp.lm.corpus import load_corpus
from autointerp.records.collect import collect


def load_pair(run: Path | None, docs, device: str):
    """(model, tokenizer, sae, layer, what) from the run's last checkpoint, else a random demo-sized pair."""
    from autointerp.sae import load_sae

    if run is not None:
        steps = [s for s in runlib.checkpoint_steps(run)
                 if (runlib.step_dir(run, s) / "sae").is_dir() and runlib.lm_checkpoint_dir(run, s).is_dir()]
        if steps:
            step = steps[-1]
            sae = load_sae(runlib.step_dir(run, step) / "sae", device=device)
            model, tokenizer = load_lm(str(runlib.lm_checkpoint_dir(run, step)), device=device)
            return model, tokenizer, sae, int(sae.cfg.layer or 0), f"{run} step {step}"
    from autointerp.lm.train import TrainConfig, build_model, train_tokenizer
    from autointerp.sae import SAEConfig, TopKSAE

    config = TrainConfig()
    tokenizer = train_tokenizer([d.text for d in docs], config.vocab_size)
    model = build_model(config, tokenizer).eval().to(device)
    sae = TopKSAE(SAEConfig(d_model=config.d_model, d_sae=16 * config.d_model, k=32)).to(device)
    return model, tokenizer, sae, config.layers // 2, f"random d{config.d_model} x{config.layers} + SAE {16 * config.d_model}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--corpus", default="debian-reference")
    p.add_argument("--max-docs", type=int, default=2000)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="time each part this many times, keep the best")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    docs = load_corpus(args.corpus, limit=args.max_docs)
    model, tokenizer, sae, layer, what = load_pair(args.run if args.run.exists() else None, docs, args.device)
    batches = [(b.input_ids, b.mask) for b in iter_activations(model, tokenizer, docs, layer,
                                                                 batch_size=args.batch_size, max_tokens=64,
                                                                 device=args.device)]
    n_tokens = sum(int(m.sum()) for _, m in batches)

    @torch.inference_mode()
    def forward() -> None:  # the whole model, logits included: the baseline
        for ids, mask in batches:
            model(input_ids=ids.to(args.device), attention_mask=mask.long().to(args.device), use_cache=False)

    @torch.inference_mode()
    def layer_and_sae() -> None:  # what any collection must do: tokenise, run up to the layer, encode
        for batch in iter_activations(model, tokenizer, docs, layer, batch_size=args.batch_size, max_tokens=64,
                                      device=args.device):
            sae.encode(batch.acts[batch.mask].to(args.device))

    records: list = []

    def run_collect() -> None:
        records[:] = collect(model, tokenizer, sae, docs, layer, top_k=args.top_k, batch_size=args.batch_size,
                             device=args.device)

    def best_of(fn) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    forward()  # warm-up
    t_forward, t_sae, t_collect = best_of(forward), best_of(layer_and_sae), best_of(run_collect)
    print(f"model: {what}; layer {layer}; {len(docs)} docs, {n_tokens:,} tokens; {len(records)} latents, "
          f"top-k {args.top_k}; torch threads {torch.get_num_threads()}; best of {args.repeats}")
    for name, t in (("forward (full model)", t_forward), ("layer + SAE encode", t_sae), ("collect", t_collect)):
        print(f"  {name:<22} {t:7.2f} s  {n_tokens / t:>10,.0f} tokens/s")
    print(f"collect / forward            = {t_collect / t_forward:.2f}x  (target <= 1.3x)")
    print(f"collect / (layer + SAE)      = {t_collect / t_sae:.2f}x  (the cost of the top-k bookkeeping and records)")


if __name__ == "__main__":
    main()
