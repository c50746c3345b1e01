"""The TopK sparse autoencoder: config, module, and the sparse autograd kernels that make it fast.

Layout (the same as EleutherAI sparsify): W_enc [d_sae, d_model], b_enc [d_sae],
W_dec [d_sae, d_model] (one unit-norm atom per row), b_dec [d_model].

    encode(x) = TopK(ReLU(W_enc @ (n(x) - b_dec) + b_enc))      n = unit-norm scaling (optional)
    decode(v, i) = sum_j v_j W_dec[i_j] + b_dec                   (only the k active rows)

Speed on CPU: the encoder's dense matmul is the only dense op. Its backward touches only the
k selected latents per token (`TopKEncode`), and decode never forms a d_sae-wide vector
(`SparseDecode`); both backward passes reduce to one sparse(CSR) x dense matmul.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autointerp.errors import UserError


@dataclass
class SAEConfig:
    d_model: int
    d_sae: int
    k: int = 32
    normalize_input: bool = True  # scale every input vector to unit norm (the paper's recipe)
    # provenance: where the activations came from
    model: str | None = None
    revision: str | None = None
    layer: int | None = None
    checkpoint_step: int | None = None

    def __post_init__(self) -> None:
        if min(self.d_model, self.d_sae, self.k) < 1:
            raise UserError(f"SAE config needs positive d_model, d_sae, k (got {self.d_model}, {self.d_sae}, {self.k})")
        if self.k > self.d_sae:
            raise UserError(f"SAE config has k={self.k} > d_sae={self.d_sae}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise UserError(f"SAE config is missing a field ({exc})") from None


# ---- sparse kernels -------------------------------------------------------------------------

def scatter_outer(indices: Tensor, weights: Tensor, dense: Tensor, num_rows: int) -> Tensor:
    """out[indices[n, j]] += weights[n, j] * dense[n], as one CSR [num_rows, N] @ dense [N, d].

    This is the weight gradient of a k-sparse layer; a CSR matmul is ~6x faster on CPU than
    index_add over a materialised [N*k, d] tensor of outer products.
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_rows)
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=indices.device)
    torch.cumsum(counts, 0, out=crow[1:])
    rows = torch.div(order, k, rounding_mode="floor")
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        sparse = torch.sparse_csr_tensor(crow, rows, weights.reshape(-1)[order].to(dense.dtype),
                                         (num_rows, n), device=dense.device, check_invariants=False)
    return sparse @ dense


def gather_dot(indices: Tensor, a: Tensor, table: Tensor) -> Tensor:
    """out[n, j] = a[n] . table[indices[n, j]], shape [N, k]: a sampled dense-dense matmul.

    torch.sparse.sampled_addmm computes only the N*k needed dot products (~40x faster on CPU
    than gathering table[indices] into an [N, k, d] tensor).
    """
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, indices.reshape(-1), a.new_zeros(n * k), (n, table.shape[0]),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a, table.t(), beta=0.0).values().view(n, k)


class TopKEncode(torch.autograd.Function):
    """ReLU(x @ W.T + b) then top-k per row (plus, optionally, top-k_aux among `aux_mask` latents).

    forward computes the dense pre-activations once and keeps only x and the selected indices;
    backward only touches the selected latents: grad_x by embedding_bag, grad_W by a CSR matmul.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int,
                aux_mask: Tensor | None = None, k_aux: int = 0):
        pre = torch.mm(x, weight.t())  # mm + in-place bias: addmm would first copy b into [N, d_sae]
        pre.add_(bias).relu_()
        values, indices = pre.topk(k, dim=-1, sorted=False)
        if aux_mask is not None and k_aux > 0:
            aux_values, aux_indices = pre.masked_fill_(~aux_mask, -torch.inf).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_values = x.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        # ReLU gate for the top-k; straight-through for the AuxK latents, whose pre-activations
        # are mostly <= 0 (that is why they are dead) and would otherwise get no gradient.
        ctx.save_for_backward(x, weight, torch.cat([indices, aux_indices], 1),
                              torch.cat([values > 0, torch.ones_like(aux_values, dtype=torch.bool)], 1))
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux_values, _gai):
        x, weight, indices, active = ctx.saved_tensors
        if grad_values is None:
            grad_values = x.new_zeros(x.shape[0], indices.shape[1] - grad_aux_values.shape[1])
        if grad_aux_values is None:
            grad_aux_values = x.new_zeros(x.shape[0], indices.shape[1] - grad_values.shape[1])
        grad = torch.cat([grad_values, grad_aux_values], 1) * active
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = scatter_outer(indices, grad, x, weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """sum_j values[n, j] * W[indices[n, j]]: embedding_bag forward, sparse backward."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor):
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weight = ctx.saved_tensors
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(indices, grad_out, weight)
        if ctx.needs_input_grad[2]:
            grad_w = scatter_outer(indices, values, grad_out, weight.shape[0])
        return grad_values, None, grad_w


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int, aux_mask: Tensor | None = None,
                k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return TopKEncode.apply(x, weight, bias, k, aux_mask, k_aux)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    return SparseDecode.apply(values, indices, weight)


# ---- the module ------------------------------------------------------------------------------

class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # W_dec: random unit-norm atoms; W_enc starts as its transpose (paper / OpenAI recipe).
        w = torch.randn(cfg.d_sae, cfg.d_model, generator=gen)
        w /= w.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model))

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def preprocess(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The SAE's input space (unit-norm rows if cfg.normalize_input) and each row's scale."""
        x = x.to(self.W_enc.dtype)
        if not self.cfg.normalize_input:
            return x, x.new_ones(x.shape[0], 1)
        norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return x / norm, norm

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, d_model] (raw activations) -> (values [N, k], indices [N, k])."""
        x, _ = self.preprocess(x)
        values, indices, _, _ = topk_encode(x - self.b_dec, self.W_enc, self.b_enc, self.cfg.k)
        return values, indices

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """-> reconstruction [N, d_model] in the SAE's input space (unit norm if normalize_input)."""
        return sparse_decode(values.to(self.W_dec.dtype), indices, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct raw activations: x [N, d_model] -> x_hat [N, d_model] at x's own scale."""
        x_in, norm = self.preprocess(x)
        values, indices, _, _ = topk_encode(x_in - self.b_dec, self.W_enc, self.b_enc, self.cfg.k)
        return self.decode(values, indices) * norm

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the part of W_dec's gradient that would only change the atoms' norms."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(along * self.W_dec)
