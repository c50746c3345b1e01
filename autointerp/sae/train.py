"""Train a TopK SAE on a stream of activation vectors (single process or torch.distributed).

`train_sae` takes any iterable of [n, d_model] float tensors (e.g. the masked tokens of each
ActivationBatch), shuffles them through a buffer so one batch is not one document's
consecutive tokens, and trains with the paper's recipe: unit-norm inputs, b_dec at the
geometric median of the first batch, FVU loss, Adam lr 1e-3; plus AuxK for dead latents,
unit-norm decoder atoms and dead-latent tracking.

Data parallel: under torchrun every rank gets the same stream (`sae train` has each rank run
the language model on its own share of the documents and exchange the activations:
autointerp.distributed), forms the same global batch and works on its own 1/world slice; the
loss is normalised by the global batch's variance and the gradients are summed across ranks,
so the result equals a single-process run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from autointerp.errors import UserError
from autointerp.sae.model import SAEConfig, TopKSAE, sparse_decode, topk_encode


@dataclass
class TrainConfig:
    batch_size: int = 4096          # tokens per optimizer step (global, over all ranks)
    lr: float = 1e-3
    warmup_frac: float = 0.0        # linear warm-up over this fraction of the steps
    decay_frac: float = 0.0         # linear decay to 0 over the last fraction of the steps
    max_tokens: int | None = None   # stop after this many training tokens (None: when the data ends)
    auxk_alpha: float = 1 / 32      # weight of the AuxK loss (OpenAI, sparsify)
    dead_tokens: int = 1_000_000    # a latent that has not fired for this many tokens is dead
    buffer_tokens: int = 65_536     # shuffle buffer size
    seed: int = 0
    adam_eps: float = 6.25e-10      # llm-jp-sae's value
    device: str = "cpu"             # where the SAE trains (cuda: the rank's GPU under torchrun)


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per logged step
    dead_fraction: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---- data ----------------------------------------------------------------------------------

def shuffled_batches(chunks: Iterable[Tensor], batch_size: int, buffer_tokens: int,
                     seed: int = 0) -> Iterator[Tensor]:
    """Re-batch a stream of [n, d] tensors into shuffled [batch_size, d] batches.

    Fills a buffer of `buffer_tokens` vectors, shuffles it, emits batches until half of it is
    left, refills. The last, partial batch is dropped unless it is the only one.
    """
    gen = torch.Generator().manual_seed(seed)
    buffer = None
    pending: list[Tensor] = []
    pending_n = 0
    emitted = False
    capacity = max(buffer_tokens, 2 * batch_size)

    def drain(buf: Tensor, keep: int) -> tuple[Iterator[Tensor], Tensor]:
        buf = buf[torch.randperm(buf.shape[0], generator=gen)]
        out = []
        while buf.shape[0] - batch_size >= keep:
            out.append(buf[:batch_size])
            buf = buf[batch_size:]
        return iter(out), buf

    for chunk in chunks:
        if chunk.ndim != 2:
            raise UserError(f"expected activation chunks of shape [n, d_model], got {tuple(chunk.shape)}")
        pending.append(chunk.detach().float().cpu())
        pending_n += chunk.shape[0]
        if pending_n + (0 if buffer is None else buffer.shape[0]) < capacity:
            continue
        buffer = torch.cat(([buffer] if buffer is not None else []) + pending)
        pending, pending_n = [], 0
        batches, buffer = drain(buffer, capacity // 2)
        for b in batches:
            emitted = True
            yield b
    rest = torch.cat(([buffer] if buffer is not None else []) + pending) if (buffer is not None or pending) else None
    if rest is not None and rest.shape[0] > 0:
        batches, rest = drain(rest, 0)
        for b in batches:
            emitted = True
            yield b
        if not emitted and rest.shape[0] > 0:
            yield rest


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm."""
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        weights = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < tol:
            return new
        guess = new
    return guess


# ---- distributed helpers ---------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: Tensor) -> Tensor:
    if _dist()[1] > 1:
        dist.all_reduce(t)
    return t


def training_loss(sae: TopKSAE, x: Tensor, total_variance: Tensor, dead_mask: Tensor | None,
                  auxk_alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """FVU (+ AuxK) of one (local slice of a) batch already in the SAE's input space."""
    num_dead = 0 if dead_mask is None else int(dead_mask.sum())
    k_aux = min(x.shape[1] // 2, num_dead)  # OpenAI appendix B.1: k_aux = d_model / 2
    values, indices, aux_values, aux_indices = topk_encode(
        x - sae.b_dec, sae.W_enc, sae.b_enc, sae.cfg.k, dead_mask if k_aux else None, k_aux)
    x_hat = sparse_decode(values, indices, sae.W_dec) + sae.b_dec
    err = x - x_hat
    fvu = err.pow(2).sum() / total_variance
    loss = fvu
    auxk = x.new_zeros(())
    if k_aux:
        err_hat = sparse_decode(aux_values, aux_indices, sae.W_dec)
        scale = min(num_dead / (x.shape[1] // 2), 1.0)
        auxk = scale * (err_hat - err.detach()).pow(2).sum() / total_variance
        loss = fvu + auxk_alpha * auxk
    return loss, {"fvu": fvu.detach(), "auxk": auxk.detach(), "indices": indices, "values": values.detach()}


def _lr_factor(step: int, total_steps: int | None, cfg: TrainConfig) -> float:
    if not total_steps:
        return 1.0
    warm = int(cfg.warmup_frac * total_steps)
    decay = int(cfg.decay_frac * total_steps)
    if warm and step < warm:
        return (step + 1) / warm
    if decay and step >= total_steps - decay:
        return max(0.0, (total_steps - step) / decay)
    return 1.0


def train_sae(chunks: Iterable[Tensor], sae_cfg: SAEConfig, train_cfg: TrainConfig | None = None,
              sae: TopKSAE | None = None,
              on_step: Callable[[int, int, dict], None] | None = None) -> tuple[TopKSAE, TrainResult]:
    """Train a TopK SAE on a stream of [n, d_model] activation tensors; returns (sae, result).

    Under torch.distributed every rank must see the same stream (see the module docstring).
    `on_step(step, tokens, logs)` is called after every step (progress bars, logging).
    """
    cfg = train_cfg or TrainConfig()
    rank, world = _dist()
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(cfg.seed)
    sae = (sae or TopKSAE(sae_cfg, seed=cfg.seed)).to(cfg.device)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    total_steps = cfg.max_tokens // cfg.batch_size if cfg.max_tokens else None
    since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long)
    result = TrainResult()
    start = time.perf_counter()
    params = list(sae.parameters())

    for step, batch in enumerate(shuffled_batches(chunks, cfg.batch_size, cfg.buffer_tokens, cfg.seed)):
        if batch.shape[1] != sae_cfg.d_model:
            raise UserError(f"activations have d_model {batch.shape[1]} but the SAE expects {sae_cfg.d_model}")
        if total_steps is not None and step >= max(total_steps, 1):
            break
        x, _ = sae.preprocess(batch.to(sae.device))
        if step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(x))
        n_global = x.shape[0]
        # this rank's slice of the global batch; the variance is the global batch's
        per = math.ceil(n_global / world)
        local = x[rank * per:(rank + 1) * per]
        total_variance = (x - x.mean(0)).pow(2).sum()
        dead_mask = (since_fired >= cfg.dead_tokens).to(sae.device)  # the counts live on the CPU
        loss, logs = training_loss(sae, local, total_variance, dead_mask if dead_mask.any() else None,
                                   cfg.auxk_alpha)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if world > 1:  # sum gradients (each rank's loss is its share of the global loss)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        sae.remove_parallel_decoder_grad()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, total_steps, cfg)
        opt.step()
        sae.normalize_decoder()

        fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long)
        fired.index_add_(0, logs["indices"].reshape(-1).cpu(), (logs["values"] > 0).reshape(-1).long().cpu())
        _all_reduce(fired)
        since_fired += n_global
        since_fired[fired > 0] = 0

        stats = torch.stack([logs["fvu"], logs["auxk"]]).cpu()
        _all_reduce(stats)
        result.steps = step + 1
        result.tokens += n_global
        entry = {"step": step + 1, "tokens": result.tokens, "fvu": float(stats[0]), "auxk": float(stats[1]),
                 "dead_fraction": float((since_fired >= cfg.dead_tokens).float().mean()),
                 "lr": opt.param_groups[0]["lr"]}
        if step % 10 == 0:
            result.history.append(entry)
        if on_step:
            on_step(step + 1, result.tokens, entry)

    if result.steps == 0:
        raise UserError("no activations to train on (the corpus or the activation stream is empty)")
    result.seconds = time.perf_counter() - start
    result.dead_fraction = float((since_fired >= cfg.dead_tokens).float().mean())
    return sae, result
