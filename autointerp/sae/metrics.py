"""SAE quality metrics, the core ones the field reports (SAEBench's core eval).

- Reconstruction: FVU / explained variance in the SAE's input space (unit-norm vectors when the
  SAE normalises its input, as trained); cosine similarity and L2 ratio ||x_hat|| / ||x|| in the
  model's own activation space (what the LM would receive).
- Sparsity: L0, dead latents (never fire on the tokens), dense latents (fire on more than 10% of
  them) and a histogram of every latent's log10 firing density.
- Model behaviour: the SAE's reconstruction is spliced into the LM at the layer (a forward hook
  replaces the decoder layer's output at the text tokens; BOS and other special tokens keep their
  own activations, as SAEBench does: their huge norms are no part of what the SAE was trained on)
  and the LM's next-token loss and distribution are compared with the clean run and with the
  layer output zero-ablated: delta CE, the CE-loss score (share of the zero-ablation loss gap
  recovered), KL divergence to the clean distribution and the KL score.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from autointerp.errors import UserError
from autointerp.sae.model import TopKSAE


@torch.no_grad()
def reconstruction_metrics(sae: TopKSAE, chunks: Iterable[Tensor]) -> dict[str, float]:
    """FVU, explained variance, L0 and dead fraction over a stream of [n, d_model] activations.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens (float64 sums, streamed).
    A latent is dead if it never fired on these tokens.
    """
    d = sae.cfg.d_model
    n = 0
    sum_x = torch.zeros(d, dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    sum_err = torch.zeros((), dtype=torch.float64)
    sum_cos = torch.zeros((), dtype=torch.float64)
    sum_ratio = torch.zeros((), dtype=torch.float64)
    l0 = torch.zeros((), dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for chunk in chunks:
        if chunk.numel() == 0:
            continue
        if chunk.shape[-1] != d:
            raise UserError(f"activations have d_model {chunk.shape[-1]} but the SAE expects {d}")
        raw = chunk.reshape(-1, d).to(sae.device)
        x, norm = sae.preprocess(raw)
        values, indices = sae.encode(raw)
        x_hat = sae.decode(values, indices)
        active = values > 0
        fired += torch.bincount(indices[active].reshape(-1).cpu(), minlength=sae.cfg.d_sae)
        l0 += active.sum().double().cpu()
        sum_err += (x - x_hat).double().pow(2).sum().cpu()
        sum_x += x.double().sum(0).cpu()
        sum_x2 += x.double().pow(2).sum().cpu()
        raw_hat = (x_hat * norm).double()  # back at the model's own scale
        sum_cos += F.cosine_similarity(raw_hat, raw.double(), dim=-1).sum().cpu()
        sum_ratio += (raw_hat.norm(dim=-1) / raw.double().norm(dim=-1).clamp_min(1e-12)).sum().cpu()
        n += x.shape[0]
    if n == 0:
        raise UserError("no activations to evaluate the SAE on")
    total_var = sum_x2 - sum_x.pow(2).sum() / n
    fvu = float(sum_err / total_var)
    density = fired.double() / n
    return {"fvu": fvu, "explained_variance": 1.0 - fvu, "l0": float(l0 / n),
            "dead_fraction": float((fired == 0).double().mean()), "mse": float(sum_err / n),
            "eval_tokens": n, "cosine_similarity": float(sum_cos / n), "l2_ratio": float(sum_ratio / n),
            "dense_fraction": float((density > DENSE).double().mean()),
            "density_histogram": density_histogram(density)}


DENSE = 0.1  # a latent firing on more than 10% of tokens is dense (SAEBench's threshold)
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
def replace_layer_output(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor],
                         where: Tensor | None = None) -> Iterator[None]:
    """Within the block, decoder layer `layer`'s hidden-state output h [B, T, d] becomes fn(h)
    (only at the positions `where` [B, T] is True, when given)."""
    from autointerp.lm.activations import decoder_layers  # lazy: keeps `import autointerp.sae` light

    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"layer {layer} is out of range: the model has {len(layers)} decoder layers")

    def replaced(h: Tensor) -> Tensor:
        new = fn(h)
        return new if where is None else torch.where(where[..., None].to(h.device), new, h)

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (replaced(output[0]),) + tuple(output[1:])
        return replaced(output)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _next_token(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probabilities [n, vocab] of the next token at every non-padding position that has
    one, its targets [n])."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    keep = attention_mask[:, 1:].bool()
    return F.log_softmax(logits[keep].float(), dim=-1), input_ids[:, 1:][keep]


@torch.no_grad()
def delta_ce(model: nn.Module, sae: TopKSAE, layer: int, batches: Iterable[tuple[Tensor, ...]]) -> dict[str, float]:
    """LM loss and next-token distribution clean / with the SAE's reconstruction spliced in at
    `layer` / with it zero-ablated.

    batches: (input_ids [B, T], attention_mask [B, T]) or with a third [B, T] mask of the
    positions to splice (default: every position). Returns mean per-token losses, delta_ce =
    ce_sae - ce_clean, the CE-loss score (the share of the zero-ablation loss gap the SAE
    recovers), the mean KL divergence from the clean distribution with the SAE (kl_sae) and
    zero-ablated (kl_zero), and the KL score 1 - kl_sae / kl_zero.
    """
    def splice(h: Tensor) -> Tensor:
        return sae(h.reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    count = 0
    model.eval()
    for batch in batches:
        input_ids, attention_mask = batch[0].to(sae.device), batch[1].to(sae.device)
        where = batch[2].to(sae.device).bool() if len(batch) > 2 else None
        clean, targets = _next_token(model, input_ids, attention_mask)
        totals["clean"] += float(F.nll_loss(clean, targets, reduction="sum"))
        for name, fn in (("sae", splice), ("zero", torch.zeros_like)):
            with replace_layer_output(model, layer, fn, where):
                changed, _ = _next_token(model, input_ids, attention_mask)
            totals[name] += float(F.nll_loss(changed, targets, reduction="sum"))
            # KL(clean || changed), summed over positions in float64
            totals[f"kl_{name}"] += float((clean.exp() * (clean - changed)).sum(dtype=torch.float64))
            del changed
        count += len(targets)
    if count == 0:
        raise UserError("no tokens to measure the LM loss on")
    clean, spliced, zero = (totals[k] / count for k in ("clean", "sae", "zero"))
    kl_sae, kl_zero = totals["kl_sae"] / count, totals["kl_zero"] / count
    gap = zero - clean
    return {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero, "delta_ce": spliced - clean,
            "ce_loss_recovered": (zero - spliced) / gap if abs(gap) > 1e-12 else float("nan"),
            "kl_sae": kl_sae, "kl_zero": kl_zero,
            "kl_score": 1.0 - kl_sae / kl_zero if kl_zero > 1e-12 else float("nan")}


# ---- output -----------------------------------------------------------------------------------

def write_metrics(directory: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(directory) / "metrics.json"
    tmp = path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(path)
    return path


METRIC_COLUMNS = [("fvu", "FVU", "{:.4f}"), ("explained_variance", "EV", "{:.3f}"),
                  ("cosine_similarity", "cos", "{:.3f}"), ("l2_ratio", "L2 ratio", "{:.3f}"),
                  ("l0", "L0", "{:.1f}"), ("dead_fraction", "dead", "{:.1%}"), ("dense_fraction", "dense", "{:.1%}"),
                  ("ce_clean", "CE", "{:.3f}"), ("ce_sae", "CE+SAE", "{:.3f}"),
                  ("ce_zero", "CE 0", "{:.3f}"), ("delta_ce", "ΔCE", "{:+.4f}"),
                  ("ce_loss_recovered", "CE score", "{:.1%}"), ("kl_sae", "KL", "{:.4f}"),
                  ("kl_score", "KL score", "{:.1%}")]


def metrics_table(rows: list[tuple[str, dict[str, Any]]], title: str = "SAE metrics") -> Table:
    """A rich table, one row per SAE (label, metrics dict)."""
    table = Table(title=title, caption="EV explained variance; cos, L2 ratio of the reconstructions; dense: fires on "
                                       ">10% of tokens; CE: LM loss clean / SAE spliced in / layer zeroed; CE and KL "
                                       "score: share of the zero-ablation gap the SAE recovers")
    table.add_column("SAE", no_wrap=True)
    for _, header, _ in METRIC_COLUMNS:
        table.add_column(header, justify="right")
    for label, m in rows:
        table.add_row(label, *[fmt.format(m[key]) if isinstance(m.get(key), (int, float)) else "-"
                               for key, _, fmt in METRIC_COLUMNS])
    return table
