"""SAE quality metrics by SAELens's definitions (`sae_lens.evals.run_evals`, which SAEBench's core
eval runs), under SAELens's names; autointerp's few others under names of their own.

    cfg = MetricsConfig(eval_docs=40)
    metrics = measure_sae(sae, model, layer, token_batches(tokenizer, texts, cfg), special_token_ids(tokenizer))

Each batch of documents runs the LM three times. The positions measured are the text tokens:
every non-padding position whose token is not a structural special token (BOS, EOS, PAD, SEP:
SAELens's `exclude_special_tokens=True`).
- Reconstruction and sparsity, on x = the decoder layer's output at the text tokens as the LM
  produces it and x_hat = the SAE's reconstruction at the same scale (an input normalisation is
  undone): explained variance, MSE, cosine, L2 ratio, L0, L1, and each latent's firing density.
- Model behaviour: the LM clean; with x_hat spliced in at the text tokens (special tokens keep
  their own activation); with the layer output zeroed at every position. The CE loss is averaged
  over the positions whose input is a text token and that have a next token; the KL divergence
  KL(clean || changed) of the next-token distribution over every text position.

`DEFINITIONS` says, per key, whose definition it follows; metrics.json records it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from autointerp.errors import UserError
from autointerp.sae.model import TopKSAE

SAELENS = "SAELens"  # sae_lens.evals.run_evals, exclude_special_tokens=True (SAELens 6.54)
SAEBENCH = "SAEBench"  # sae_bench.evals.core calculate_misc_metrics, from SAELens's feature densities
AUTOINTERP = "autointerp"

DENSE = 0.1  # a latent firing on more than 10% of tokens is dense (SAEBench's freq_over_10_percent)

# key -> (whose definition, the definition in one line)
DEFINITIONS: dict[str, tuple[str, str]] = {
    "explained_variance": (SAELENS, "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, x the layer output as the LM "
                                    "produces it"),
    "mse": (SAELENS, "mean over tokens of ||x - x_hat||^2 (summed over dimensions), at the LM's scale"),
    "cossim": (SAELENS, "mean cosine similarity of x_hat and x"),
    "l2_ratio": (SAELENS, "mean ||x_hat|| / ||x||"),
    "l0": (SAELENS, "mean number of active latents per token"),
    "l1": (SAELENS, "mean sum of |latent activations| per token"),
    "ce_loss_without_sae": (SAELENS, "mean next-token loss of the clean LM"),
    "ce_loss_with_sae": (SAELENS, "the same with x_hat spliced in at the text tokens"),
    "ce_loss_with_ablation": (SAELENS, "the same with the layer output zeroed at every position (BOS too)"),
    "ce_loss_score": (SAELENS, "(ce_loss_with_ablation - ce_loss_with_sae) / (ce_loss_with_ablation - "
                               "ce_loss_without_sae)"),
    "kl_div_with_sae": (SAELENS, "mean KL(clean || SAE spliced in) of the next-token distribution"),
    "kl_div_with_ablation": (SAELENS, "mean KL(clean || layer output zeroed at every position)"),
    "kl_div_score": (SAELENS, "(kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation"),
    "dead_fraction": (SAEBENCH, "latents that never fire on these tokens (1 - frac_alive)"),
    "dense_fraction": (SAEBENCH, "latents firing on more than 10% of these tokens (freq_over_10_percent)"),
    "fvu": (AUTOINTERP, "1 - explained_variance"),
    "explained_variance_unit_norm": (AUTOINTERP, "explained variance on the unit-norm vectors the SAE is trained on "
                                                 "(SAEs that normalise their input)"),
    "delta_ce": (AUTOINTERP, "ce_loss_with_sae - ce_loss_without_sae"),
    "eval_tokens": (AUTOINTERP, "text tokens measured: every figure but the CE losses averages over them"),
    "ce_tokens": (AUTOINTERP, "text tokens with a next token: the CE losses average over them"),
}
# Keys only metrics.json files written before these definitions have (dropped on rewrite).
LEGACY_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl_sae", "kl_zero", "kl_score",
               "cosine_similarity")
# Keys such a file has under today's names but by the earlier definitions (unit-norm explained
# variance; delta CE over BOS's prediction too).
REDEFINED = ("explained_variance", "fvu", "delta_ce")


def by_current_definitions(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` less the figures an older metrics.json (no "definitions") holds by earlier definitions."""
    if "definitions" in metrics:
        return metrics
    return {k: v for k, v in metrics.items() if k not in REDEFINED}


@dataclass
class MetricsConfig:
    """How an SAE is measured on held-out documents (`sae metrics`, and `sae train` after training)."""

    eval_docs: int = 200
    """Held-out documents to measure on (documents `lm train` holds out)."""
    seq_len: int = 64
    """First tokens of each document, BOS included."""
    batch_size: int = 8
    """Documents per LM forward pass; each pass holds [batch, seq_len, vocab] logits."""


def special_token_ids(tokenizer) -> list[int]:
    """The structural special tokens SAELens leaves out (sae_lens.util.get_special_token_ids): BOS,
    EOS, PAD, SEP and decoder-start, not the tokenizer's additional special tokens."""
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
    return sorted({i for i in (getattr(tokenizer, a, None) for a in attrs) if isinstance(i, int)})


def token_batches(tokenizer, texts: Sequence[str], cfg: MetricsConfig) -> Iterator[tuple[Tensor, Tensor]]:
    """(input_ids [B, T], attention_mask [B, T]) over the first cfg.seq_len tokens of each text, right-padded."""
    from autointerp.lm.activations import pad_batch  # lazy: keeps `import autointerp.sae` light

    for start in range(0, len(texts), cfg.batch_size):
        yield pad_batch(tokenizer, texts[start:start + cfg.batch_size], cfg.seq_len)


# ---- reconstruction and sparsity ----------------------------------------------------------------

class ReconstructionStats:
    """Streamed float64 sums of the reconstruction and sparsity metrics over [n, d_model] activations."""

    def __init__(self, sae: TopKSAE):
        self.sae = sae
        d = sae.cfg.d_model
        self.n = 0
        self.sums = {name: torch.zeros((), dtype=torch.float64) for name in
                     ("x2", "err", "cos", "ratio", "l0", "l1", "unit_x2", "unit_err")}
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_unit_x = torch.zeros(d, dtype=torch.float64)
        self.fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)

    @torch.no_grad()
    def add(self, raw: Tensor) -> Tensor:
        """Count the activations raw [n, d_model]; return the SAE's reconstruction at their scale."""
        sae, s = self.sae, self.sums
        d = sae.cfg.d_model
        if raw.shape[-1] != d:
            raise UserError(f"activations have d_model {raw.shape[-1]} but the SAE expects {d}")
        raw = raw.reshape(-1, d).to(sae.device)
        if raw.shape[0] == 0:
            return raw
        x_in, norm = sae.preprocess(raw)
        values, indices = sae.encode(raw)
        x_hat_in = sae.decode(values, indices)
        x_hat = x_hat_in * norm
        x, xh = raw.double(), x_hat.double()
        active = values != 0
        self.fired += torch.bincount(indices[active].reshape(-1).cpu(), minlength=sae.cfg.d_sae)
        s["l0"] += active.sum().double().cpu()
        s["l1"] += values.abs().double().sum().cpu()
        s["err"] += (x - xh).pow(2).sum().cpu()
        s["x2"] += x.pow(2).sum().cpu()
        self.sum_x += x.sum(0).cpu()
        s["cos"] += F.cosine_similarity(xh, x, dim=-1).sum().cpu()
        norm_in = x.norm(dim=-1)
        s["ratio"] += (xh.norm(dim=-1) / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum().cpu()  # SAELens's guard
        s["unit_err"] += (x_in - x_hat_in).double().pow(2).sum().cpu()
        s["unit_x2"] += x_in.double().pow(2).sum().cpu()
        self.sum_unit_x += x_in.double().sum(0).cpu()
        self.n += raw.shape[0]
        return x_hat.to(raw.dtype)

    def result(self) -> dict[str, Any]:
        n, s = self.n, self.sums
        if n == 0:
            raise UserError("no activations to evaluate the SAE on")

        def explained(err: Tensor, x2: Tensor, sum_x: Tensor) -> float:
            variance = x2 / n - (sum_x / n).pow(2).sum()
            return float(1.0 - (err / n) / variance) if variance > 1e-10 else float(err / n < 1e-10)

        ev = explained(s["err"], s["x2"], self.sum_x)
        density = self.fired.double() / n
        out = {"explained_variance": ev, "fvu": 1.0 - ev, "mse": float(s["err"] / n),
               "cossim": float(s["cos"] / n), "l2_ratio": float(s["ratio"] / n),
               "l0": float(s["l0"] / n), "l1": float(s["l1"] / n),
               "dead_fraction": float((density == 0).double().mean()),
               "dense_fraction": float((density > DENSE).double().mean()),
               "density_histogram": density_histogram(density), "eval_tokens": n}
        if self.sae.cfg.normalize_input:
            out["explained_variance_unit_norm"] = explained(s["unit_err"], s["unit_x2"], self.sum_unit_x)
        return out


def reconstruction_metrics(sae: TopKSAE, chunks: Iterable[Tensor]) -> dict[str, Any]:
    """The reconstruction and sparsity metrics over a stream of [n, d_model] activations (the
    tokens to measure, already chosen)."""
    stats = ReconstructionStats(sae)
    for chunk in chunks:
        stats.add(chunk)
    return stats.result()


DENSITY_EDGES = [x / 2 for x in range(-14, 1)]  # log10 density bins -7, -6.5, ..., 0


def density_histogram(density: Tensor) -> dict[str, Any]:
    """Counts of latents over log10 firing-density bins (the report draws them on a log axis);
    latents that never fired are counted apart."""
    live = density[density > 0]
    logs = live.log10().clamp(DENSITY_EDGES[0], DENSITY_EDGES[-1]).numpy()
    import numpy as np

    counts, _ = np.histogram(logs, bins=DENSITY_EDGES)
    return {"log10_edges": DENSITY_EDGES, "counts": [int(c) for c in counts], "never": int((density == 0).sum())}


# ---- splicing into the LM ---------------------------------------------------------------------

@contextlib.contextmanager
def replace_layer_output(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, decoder layer `layer`'s hidden-state output h [B, T, d] becomes fn(h)."""
    from autointerp.lm.activations import decoder_layers  # lazy: keeps `import autointerp.sae` light

    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"layer {layer} is out of range: the model has {len(layers)} decoder layers")

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def measure_sae(sae: TopKSAE, model: nn.Module, layer: int, batches: Iterable[tuple[Tensor, Tensor]],
                special_ids: Sequence[int]) -> dict[str, Any]:
    """Every metric of DEFINITIONS for `sae` reading decoder layer `layer`'s output of `model`.

    batches: (input_ids [B, T], attention_mask [B, T]); special_ids: the tokens left out
    (special_token_ids). Returns the metrics, their token counts and "definitions" (key ->
    "WHOSE: definition").
    """
    stats = ReconstructionStats(sae)
    special = torch.tensor(list(special_ids), dtype=torch.long, device=sae.device)
    sums = dict.fromkeys(("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
                          "kl_div_with_sae", "kl_div_with_ablation"), 0.0)
    n_ce = n_kl = 0
    model.eval()
    for input_ids, attention_mask in batches:
        ids, attention = input_ids.to(sae.device), attention_mask.to(sae.device).bool()
        text = attention & ~torch.isin(ids, special)
        if not text.any():
            continue
        # among the text positions: those with a next token, and that token
        has_next = F.pad(attention[:, 1:], (0, 1), value=False)[text]
        targets = F.pad(ids[:, 1:], (0, 1))[text][has_next]

        def log_probs() -> Tensor:  # [n_text, vocab]
            logits = model(input_ids=ids, attention_mask=attention.long()).logits
            return F.log_softmax(logits[text].float(), dim=-1)

        def splice(h: Tensor) -> Tensor:
            out = h.clone()
            out[text] = stats.add(h[text]).to(h.dtype)
            return out

        clean = log_probs()
        sums["ce_loss_without_sae"] += float(F.nll_loss(clean[has_next], targets, reduction="sum"))
        for name, fn in (("with_sae", splice), ("with_ablation", torch.zeros_like)):
            with replace_layer_output(model, layer, fn):
                changed = log_probs()
            sums[f"ce_loss_{name}"] += float(F.nll_loss(changed[has_next], targets, reduction="sum"))
            sums[f"kl_div_{name}"] += float((clean.exp() * (clean - changed)).sum(dtype=torch.float64))
            del changed
        n_ce += int(has_next.sum())
        n_kl += int(text.sum())
    if n_ce == 0:
        raise UserError("no text tokens with a next token to measure the LM loss on")
    metrics = stats.result()
    m = {k: v / (n_kl if k.startswith("kl") else n_ce) for k, v in sums.items()}
    gap = m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]
    m["ce_loss_score"] = (m["ce_loss_with_ablation"] - m["ce_loss_with_sae"]) / gap if abs(gap) > 1e-12 \
        else float("nan")
    m["kl_div_score"] = (m["kl_div_with_ablation"] - m["kl_div_with_sae"]) / m["kl_div_with_ablation"] \
        if m["kl_div_with_ablation"] > 1e-12 else float("nan")
    m["delta_ce"] = m["ce_loss_with_sae"] - m["ce_loss_without_sae"]
    metrics.update(m, ce_tokens=n_ce)
    metrics["definitions"] = {k: f"{whose}: {text}" for k, (whose, text) in DEFINITIONS.items() if k in metrics}
    return metrics


# ---- output -----------------------------------------------------------------------------------

def write_metrics(directory: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(directory) / "metrics.json"
    tmp = path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(path)
    return path


METRIC_COLUMNS = [("explained_variance", "EV", "{:.3f}"), ("explained_variance_unit_norm", "EV unit", "{:.3f}"),
                  ("cossim", "cos", "{:.3f}"), ("l2_ratio", "L2 ratio", "{:.3f}"),
                  ("l0", "L0", "{:.1f}"), ("dead_fraction", "dead", "{:.1%}"), ("dense_fraction", "dense", "{:.1%}"),
                  ("ce_loss_without_sae", "CE", "{:.3f}"), ("ce_loss_with_sae", "CE+SAE", "{:.3f}"),
                  ("ce_loss_with_ablation", "CE 0", "{:.3f}"), ("delta_ce", "ΔCE", "{:+.4f}"),
                  ("ce_loss_score", "CE score", "{:.1%}"), ("kl_div_with_sae", "KL", "{:.4f}"),
                  ("kl_div_score", "KL score", "{:.1%}")]


def metrics_table(rows: list[tuple[str, dict[str, Any]]], title: str = "SAE metrics") -> Table:
    """A rich table, one row per SAE (label, metrics dict)."""
    table = Table(title=title, caption="SAELens's definitions (sae_lens.evals.run_evals) over the text tokens: EV "
                                       "explained variance of the layer output; cos, L2 ratio of the reconstructions; "
                                       "dense: fires on >10% of tokens; CE: LM loss clean / SAE spliced in / layer "
                                       "zeroed; CE and KL score: share of the zero-ablation gap the SAE recovers. "
                                       "autointerp's own: EV unit, on the unit-norm inputs the SAE trains on; ΔCE")
    table.add_column("SAE", no_wrap=True)
    for _, header, _ in METRIC_COLUMNS:
        table.add_column(header, justify="right")
    for label, m in rows:
        m = by_current_definitions(m)
        table.add_row(label, *[fmt.format(m[key]) if isinstance(m.get(key), (int, float)) else "-"
                               for key, _, fmt in METRIC_COLUMNS])
    return table
