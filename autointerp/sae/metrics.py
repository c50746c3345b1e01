"""SAE quality metrics: reconstruction (FVU, explained variance, L0, dead latents) and delta CE.

Reconstruction metrics are measured in the SAE's input space (unit-norm vectors when the SAE
normalises its input, as trained). Delta CE splices the SAE's reconstruction into the LM at the
layer with a forward hook that replaces the decoder layer's output, and compares the LM's
next-token loss with the clean run and with the layer output zero-ablated.
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
    l0 = torch.zeros((), dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for chunk in chunks:
        if chunk.numel() == 0:
            continue
        if chunk.shape[-1] != d:
            raise UserError(f"activations have d_model {chunk.shape[-1]} but the SAE expects {d}")
        x, _ = sae.preprocess(chunk.reshape(-1, d).to(sae.device))
        values, indices = sae.encode(chunk.reshape(-1, d).to(sae.device))
        x_hat = sae.decode(values, indices)
        active = values > 0
        fired[indices[active].cpu()] = True
        l0 += active.sum().double().cpu()
        sum_err += (x - x_hat).double().pow(2).sum().cpu()
        sum_x += x.double().sum(0).cpu()
        sum_x2 += x.double().pow(2).sum().cpu()
        n += x.shape[0]
    if n == 0:
        raise UserError("no activations to evaluate the SAE on")
    total_var = sum_x2 - sum_x.pow(2).sum() / n
    fvu = float(sum_err / total_var)
    return {"fvu": fvu, "explained_variance": 1.0 - fvu, "l0": float(l0 / n),
            "dead_fraction": float((~fired).float().mean()), "mse": float(sum_err / n),
            "eval_tokens": n}


# ---- splicing into the LM ---------------------------------------------------------------------

@contextlib.contextmanager
def replace_layer_output(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, decoder layer `layer`'s hidden-state output h [B, T, d] becomes fn(h)."""
    from autointerp.activations import decoder_layers  # lazy: keeps `import autointerp.sae` light

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


def _lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over non-padding positions, and the number of targets."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return float(loss), int((targets != -100).sum())


@torch.no_grad()
def delta_ce(model: nn.Module, sae: TopKSAE, layer: int,
             batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """LM loss clean / with the SAE's reconstruction spliced in at `layer` / with it zero-ablated.

    batches: (input_ids [B, T], attention_mask [B, T]). Returns mean per-token losses, the
    difference (delta_ce = ce_sae - ce_clean) and the fraction of the zero-ablation loss gap
    the SAE recovers.
    """
    def splice(h: Tensor) -> Tensor:
        return sae(h.reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    model.eval()
    for input_ids, attention_mask in batches:
        input_ids, attention_mask = input_ids.to(sae.device), attention_mask.to(sae.device)
        loss, n = _lm_loss(model, input_ids, attention_mask)
        totals["clean"] += loss
        with replace_layer_output(model, layer, splice):
            totals["sae"] += _lm_loss(model, input_ids, attention_mask)[0]
        with replace_layer_output(model, layer, torch.zeros_like):
            totals["zero"] += _lm_loss(model, input_ids, attention_mask)[0]
        count += n
    if count == 0:
        raise UserError("no tokens to measure the LM loss on")
    clean, spliced, zero = (totals[k] / count for k in ("clean", "sae", "zero"))
    gap = zero - clean
    return {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero, "delta_ce": spliced - clean,
            "ce_loss_recovered": (zero - spliced) / gap if abs(gap) > 1e-12 else float("nan")}


# ---- output -----------------------------------------------------------------------------------

def write_metrics(directory: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(directory) / "metrics.json"
    tmp = path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(path)
    return path


METRIC_COLUMNS = [("fvu", "FVU", "{:.4f}"), ("explained_variance", "EV", "{:.3f}"),
                  ("l0", "L0", "{:.1f}"), ("dead_fraction", "dead", "{:.1%}"),
                  ("ce_clean", "CE", "{:.3f}"), ("ce_sae", "CE+SAE", "{:.3f}"),
                  ("ce_zero", "CE 0", "{:.3f}"), ("delta_ce", "ΔCE", "{:+.4f}"),
                  ("ce_loss_recovered", "recov.", "{:.1%}")]


def metrics_table(rows: list[tuple[str, dict[str, Any]]], title: str = "SAE metrics") -> Table:
    """A rich table, one row per SAE (label, metrics dict)."""
    table = Table(title=title, caption="EV explained variance; CE LM loss clean / with the SAE spliced in / "
                                       "layer zero-ablated; recov. = share of the zero-ablation loss the SAE recovers")
    table.add_column("SAE", no_wrap=True)
    for _, header, _ in METRIC_COLUMNS:
        table.add_column(header, justify="right")
    for label, m in rows:
        table.add_row(label, *[fmt.format(m[key]) if isinstance(m.get(key), (int, float)) else "-"
                               for key, _, fmt in METRIC_COLUMNS])
    return table
