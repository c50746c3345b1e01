"""autointerp's SAE metrics against SAELens's own `sae_lens.evals.run_evals`, on the same tokens.

    .venv/bin/python evals/saelens_parity.py RUN/layer-9/sae --eval-docs 40 [--tl-name google/gemma-3-270m]

The main venv measures the SAE with `autointerp sae metrics`' code and writes the token ids of the
held-out documents; the bench venv (.venv-bench: SAELens, TransformerLens) then runs `run_evals`
(exclude_special_tokens=True) on exactly those ids, one document per batch so that no padding is
needed, with a HookedTransformer built from the same local Hugging Face folder and the SAE
rebuilt as a SAELens SAE; the table shows both, metric by metric, with the relative difference.

Run under .venv-bench as `saelens_parity.py saelens ...` (what the main venv does), the script is
the SAELens side alone; tests/test_saelens_parity.py imports `saelens_metrics` from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
# the figures both sides compute, by SAELens's names (dead/dense: SAEBench's, from SAELens's densities)
COMPARED = ("explained_variance", "mse", "cossim", "l2_ratio", "l0", "l1", "dead_fraction", "dense_fraction",
            "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score",
            "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score", "eval_tokens")


# ---- the SAELens side (runs in .venv-bench) ------------------------------------------------------

def hooked_transformer(lm_dir: str, tl_name: str | None = None):
    """A TransformerLens model with the weights of the Hugging Face folder `lm_dir`, unprocessed
    (no LayerNorm folding or centring, so its activations are the HF model's).

    tl_name: TransformerLens's name for the architecture where it only knows a model by name
    (google/gemma-3-270m); by default the architecture comes from lm_dir/config.json (the folder's
    path must then not contain "llama": TransformerLens matches Llama names before reading it).
    """
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    hf = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    name = tl_name or lm_dir
    cfg = loading.get_pretrained_model_config(name, device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(loading.get_pretrained_state_dict(name, cfg, hf_model=hf), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    return model.eval()


def saelens_sae_from_autointerp(sae_dir: str, hook_name: str):
    """autointerp's TopK SAE folder as a SAELens TopKSAE: unit-norm input becomes SAELens's
    constant_norm_rescale (x * sqrt(d) / ||x||), its sqrt(d) folded out of the weights (the
    inverse of autointerp's SAELens import)."""
    import torch
    from safetensors.torch import load_file
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = json.loads((Path(sae_dir) / "config.json").read_text())
    t = load_file(str(Path(sae_dir) / "sae.safetensors"))
    d = cfg["d_model"]
    scale = math.sqrt(d) if cfg.get("normalize_input", True) else 1.0
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=cfg["d_sae"], k=cfg["k"],
                                normalize_activations="constant_norm_rescale" if scale != 1.0 else "none",
                                metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"].t() / scale)
        sae.b_enc.copy_(t["b_enc"])
        sae.W_dec.copy_(t["W_dec"] * scale)
        sae.b_dec.copy_(t["b_dec"] * scale)
    return sae.eval()


class DocumentStore:
    """What run_evals asks of an ActivationsStore: the given documents' token ids, one per batch."""

    def __init__(self, docs: list[list[int]]):
        self.docs, self.next = docs, 0
        self.context_size = max(len(d) for d in docs)
        self.store_batch_size_prompts = 1

    def get_batch_tokens(self, batch_size: int):
        import torch

        assert batch_size == 1, "documents differ in length: one per batch"
        doc = self.docs[self.next]
        self.next += 1
        return torch.tensor([doc], dtype=torch.long)

    def reset_input_dataset(self) -> None:
        self.next = 0


def saelens_metrics(model, sae, docs: list[list[int]]) -> dict:
    """run_evals on exactly `docs`, flattened to autointerp's keys."""
    import torch
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    n = len(docs)
    config = EvalConfig(batch_size_prompts=1, n_eval_reconstruction_batches=n, n_eval_sparsity_variance_batches=n,
                        compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                        compute_variance_metrics=True, compute_featurewise_density_statistics=True)
    groups, features = run_evals(sae, DocumentStore(docs), model, ActivationScaler(), config,
                                 exclude_special_tokens=True)
    flat = {k: v for group in groups.values() for k, v in group.items()}
    density = torch.tensor(features["feature_density"])
    special = set(get_special_token_ids(model.tokenizer))
    flat.update(dead_fraction=1.0 - float((density > 0).float().mean()),  # SAEBench: 1 - frac_alive
                dense_fraction=float((density > 0.1).float().mean()),  # SAEBench: freq_over_10_percent
                eval_tokens=sum(t not in special for d in docs for t in d),
                feature_density=features["feature_density"], sae_lens_version=config.library_version)
    return flat


def _saelens_main(argv: list[str]) -> None:
    a = argparse.ArgumentParser(prog="saelens_parity.py saelens")
    a.add_argument("--lm", required=True)
    a.add_argument("--sae", required=True, help="autointerp SAE folder (config.json + sae.safetensors)")
    a.add_argument("--layer", type=int, required=True)
    a.add_argument("--tokens", required=True, help="JSON: a list of token-id lists, one per document")
    a.add_argument("--out", required=True)
    a.add_argument("--tl-name")
    args = a.parse_args(argv)
    model = hooked_transformer(args.lm, args.tl_name)
    sae = saelens_sae_from_autointerp(args.sae, f"blocks.{args.layer}.hook_resid_post")
    result = saelens_metrics(model, sae, json.loads(Path(args.tokens).read_text()))
    Path(args.out).write_text(json.dumps(result, indent=2))


# ---- the autointerp side (runs in .venv) -------------------------------------------------------

def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def _main(argv: list[str]) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("sae_dir", type=Path)
    a.add_argument("--model", help="Default: the model in the SAE's config.")
    a.add_argument("--layer", type=int)
    a.add_argument("--corpus", default="debian-reference")
    a.add_argument("--eval-docs", type=int, default=40)
    a.add_argument("--seq-len", type=int, default=64)
    a.add_argument("--tl-name", help="TransformerLens's name for the model (google/gemma-3-270m for Gemma-3-270M)")
    a.add_argument("--bench-python", type=Path, default=BENCH_PYTHON)
    args = a.parse_args(argv)

    from autointerp import run as rundir
    from autointerp.lm.activations import load_lm
    from autointerp.lm.gguf import resolve_lm
    from autointerp.sae import load_sae
    from autointerp.sae.cli import _split_docs, measure
    from autointerp.sae.metrics import MetricsConfig

    sae = load_sae(args.sae_dir)
    model_ref = args.model or rundir.resolve_model(sae.cfg.model, args.sae_dir)
    layer = sae.cfg.layer if args.layer is None else args.layer
    lm, tokenizer = load_lm(model_ref)
    cfg = MetricsConfig(eval_docs=args.eval_docs, seq_len=args.seq_len)
    _, held = _split_docs(args.corpus, None, cfg.eval_docs)
    ours = measure(sae, lm, tokenizer, held, layer, cfg)
    tokens = tokenizer([d.text for d in held], truncation=True, max_length=cfg.seq_len)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokens.json").write_text(json.dumps(tokens))
        proc = subprocess.run([str(args.bench_python), __file__, "saelens", "--lm", str(resolve_lm(model_ref)),
                               "--sae", str(args.sae_dir), "--layer", str(layer), "--tokens", f"{tmp}/tokens.json",
                               "--out", f"{tmp}/saelens.json", *(["--tl-name", args.tl_name] if args.tl_name else [])],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit("SAELens run failed:\n" + proc.stderr[-3000:])
        theirs = json.loads((Path(tmp) / "saelens.json").read_text())
    print(f"{args.sae_dir}, layer {layer}: {len(held)} held-out documents, {ours['eval_tokens']:,} text tokens; "
          f"SAELens {theirs.get('sae_lens_version')}\n")
    print("| metric | autointerp | SAELens run_evals | relative difference |\n|---|---:|---:|---:|")
    for key in COMPARED:
        print(f"| {key} | {ours[key]:.6g} | {theirs[key]:.6g} | {relative_difference(ours[key], theirs[key]):.1e} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["saelens"]:
        _saelens_main(sys.argv[2:])
    else:
        _main(sys.argv[1:])
