"""Save and load SAEs: this project's format, plus imports from llm-jp-sae, sparsify and SAELens.

Ours:      DIR/sae.safetensors (W_enc [d_sae, d], b_enc, W_dec [d_sae, d], b_dec) + DIR/config.json
           ({"format": "autointerp-topk-sae", ...SAEConfig}).
llm-jp-sae: DIR/config.json (model_type "topk_sae", d_in, num_latents, k) + DIR/model.safetensors
           (encoder.weight [n, d], encoder.bias, decoder.weight [d, n], b_dec); inputs unit-norm.
sparsify:  DIR/cfg.json (d_in, k, num_latents | expansion_factor) + DIR/sae.safetensors
           (encoder.weight [n, d], encoder.bias, W_dec [n, d], b_dec); raw inputs.
SAELens:   DIR/cfg.json (architecture "topk", d_in, d_sae, k, ...) + DIR/sae_weights.safetensors
           (W_enc [d, n], b_enc, W_dec [n, d], b_dec).
Every import is converted to the same TopKSAE, so the encodings are the source's own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autointerp.errors import UserError
from autointerp.files import PICKLE_SUFFIXES, sae_format
from autointerp.sae.model import SAEConfig, TopKSAE

FORMAT = "autointerp-topk-sae"


def save_sae(sae: TopKSAE, directory: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write DIR/sae.safetensors + DIR/config.json (each atomically: temp file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in
               (("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec), ("b_dec", sae.b_dec))}
    tmp = directory / "sae.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(directory / "sae.safetensors")
    config = {"format": FORMAT, **sae.cfg.to_dict(), **(extra_config or {})}
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    tmp.replace(directory / "config.json")
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None


def _need(tensors: dict[str, torch.Tensor], path: Path, *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{path}: missing tensors {missing} (has {sorted(tensors)})")
    return [tensors[n].float() for n in names]


def _build(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, source: Path, device: str) -> TopKSAE:
    """A TopKSAE from [d_sae, d] encoder/decoder weights, after checking every shape."""
    expected = {"W_enc": (cfg.d_sae, cfg.d_model), "b_enc": (cfg.d_sae,),
                "W_dec": (cfg.d_sae, cfg.d_model), "b_dec": (cfg.d_model,)}
    for name, tensor in zip(expected, (W_enc, b_enc, W_dec, b_dec)):
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)} but the config "
                            f"(d_model={cfg.d_model}, d_sae={cfg.d_sae}) needs {expected[name]}")
    sae = TopKSAE(cfg, seed=None)
    with torch.no_grad():
        for p, t in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), (W_enc, b_enc, W_dec, b_dec)):
            p.copy_(t)
    return sae.to(device)


def _int(cfg: dict[str, Any], path: Path, *keys: str) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            try:
                return int(cfg[key])
            except (TypeError, ValueError):
                raise UserError(f"{path}: {key} must be an integer, got {cfg[key]!r}") from None
    raise UserError(f"{path}: config has none of {list(keys)}")


def _load_ours(d: Path, device: str) -> TopKSAE:
    raw = _read_json(d / "config.json")
    cfg = SAEConfig.from_dict(raw)
    W_enc, b_enc, W_dec, b_dec = _need(_read_safetensors(d / "sae.safetensors"), d / "sae.safetensors",
                                       "W_enc", "b_enc", "W_dec", "b_dec")
    return _build(cfg, W_enc, b_enc, W_dec, b_dec, d, device)


def _load_llmjp(d: Path, device: str) -> TopKSAE:
    raw = _read_json(d / "config.json")
    cfg = SAEConfig(d_model=_int(raw, d / "config.json", "d_in"),
                    d_sae=_int(raw, d / "config.json", "num_latents", "n_dim"),
                    k=_int(raw, d / "config.json", "k"), normalize_input=True)  # its train.py: x / ||x||
    path = d / "model.safetensors"
    enc_w, enc_b, dec_w, b_dec = _need(_read_safetensors(path), path,
                                       "encoder.weight", "encoder.bias", "decoder.weight", "b_dec")
    return _build(cfg, enc_w, enc_b, dec_w.t(), b_dec, d, device)


def _load_sparsify(d: Path, device: str) -> TopKSAE:
    raw = _read_json(d / "cfg.json")
    d_in = _int(raw, d / "cfg.json", "d_in")
    n = raw.get("num_latents") or d_in * int(raw.get("expansion_factor") or 0)
    if raw.get("transcode") or raw.get("skip_connection"):
        raise UserError(f"{d}: sparsify transcoders / skip connections are not TopK SAEs; not supported")
    if raw.get("activation", "topk") != "topk":
        raise UserError(f"{d}: sparsify activation {raw.get('activation')!r} is not supported (only topk)")
    cfg = SAEConfig(d_model=d_in, d_sae=int(n), k=_int(raw, d / "cfg.json", "k"), normalize_input=False)
    path = d / "sae.safetensors"
    enc_w, enc_b, W_dec, b_dec = _need(_read_safetensors(path), path, "encoder.weight", "encoder.bias", "W_dec", "b_dec")
    return _build(cfg, enc_w, enc_b, W_dec, b_dec, d, device)


def _load_saelens(d: Path, device: str) -> TopKSAE:
    raw = _read_json(d / "cfg.json")
    arch = raw.get("architecture", "topk")
    if arch != "topk":
        raise UserError(f"{d}: SAELens architecture {arch!r} is not a TopK SAE")
    d_in = _int(raw, d / "cfg.json", "d_in")
    k = _int(raw, d / "cfg.json", "k") if "k" in raw else _int(raw.get("activation_fn_kwargs") or {}, d / "cfg.json", "k")
    path = d / "sae_weights.safetensors"
    W_enc, b_enc, W_dec, b_dec = _need(_read_safetensors(path), path, "W_enc", "b_enc", "W_dec", "b_dec")
    cfg = SAEConfig(d_model=d_in, d_sae=_int(raw, d / "cfg.json", "d_sae"), k=k)
    if W_enc.ndim != 2 or W_enc.shape != (cfg.d_model, cfg.d_sae):
        raise UserError(f"{path}: W_enc has shape {tuple(W_enc.shape)}, config needs ({cfg.d_model}, {cfg.d_sae})")
    W_enc = W_enc.t()
    # SAELens: pre = (n(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc [* ||W_dec||], then topk, relu.
    if not raw.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec  # our encoder always subtracts b_dec: add it back
    if raw.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    norm = raw.get("normalize_activations", "none") or "none"
    if norm == "constant_norm_rescale":
        # x -> x * sqrt(d) / ||x||: our unit-norm input scaled by sqrt(d), folded into the weights
        scale = math.sqrt(d_in)
        cfg.normalize_input = True
        W_enc, b_dec, W_dec = W_enc * scale, b_dec / scale, W_dec / scale  # b_enc unchanged
    elif norm != "none":
        raise UserError(f"{d}: SAELens normalize_activations={norm!r} is not supported "
                        "(supported: none, constant_norm_rescale)")
    else:
        cfg.normalize_input = False
    return _build(cfg, W_enc, b_enc, W_dec, b_dec, d, device)


def _load_pickle(path: Path, device: str) -> TopKSAE:
    """An explicitly trusted torch.save'd state dict in any of the layouts above."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if hasattr(state, "state_dict"):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    d = path.parent
    raw = next((_read_json(p) for p in (d / "config.json", d / "cfg.json") if p.exists()), {})
    t = {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "W_enc" in t and "encoder.weight" not in t:
        W_enc = t["W_enc"] if raw.get("format") == FORMAT else t["W_enc"].t()  # SAELens: [d, n]
        W_dec = t["W_dec"]
        b_enc = t["b_enc"]
    elif "decoder.weight" in t:
        W_enc, b_enc, W_dec = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"].t()
    else:
        W_enc, b_enc, W_dec = _need(t, path, "encoder.weight", "encoder.bias", "W_dec")
    b_dec = _need(t, path, "b_dec")[0]
    if "k" not in raw:
        raise UserError(f"{path}: a config.json or cfg.json with k must sit next to the pickle file")
    cfg = SAEConfig(d_model=W_enc.shape[1], d_sae=W_enc.shape[0], k=int(raw["k"]),
                    normalize_input=bool(raw.get("normalize_input", raw.get("model_type") == "topk_sae")))
    return _build(cfg, W_enc, b_enc, W_dec, b_dec, path, device)


def detect_format(directory: Path) -> str:
    fmt = sae_format(directory)
    if fmt is None:
        raise UserError(f"{directory}: no SAE found (expected config.json + sae.safetensors, config.json + "
                        "model.safetensors, or cfg.json + sae.safetensors / sae_weights.safetensors)")
    return fmt


def load_sae(path: str | Path, trust_pickle: bool = False, device: str = "cpu") -> TopKSAE:
    """Load an SAE directory (or a weights file inside one), auto-detecting its format."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such SAE directory or file")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            return _load_pickle_checked(path, trust_pickle, device)
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: not an SAE weights file (expected .safetensors)")
        path = path.parent
    fmt = detect_format(path)
    if fmt.startswith("pickle:"):
        return _load_pickle_checked(path / fmt.split(":", 1)[1], trust_pickle, device)
    loader = {"autointerp": _load_ours, "llm-jp-sae": _load_llmjp, "sparsify": _load_sparsify,
              "saelens": _load_saelens}[fmt]
    return loader(path, device)


def _load_pickle_checked(path: Path, trust_pickle: bool, device: str) -> TopKSAE:
    if not trust_pickle:
        raise UserError(f"{path}: refusing to load a pickle-based file (it can run arbitrary code); "
                        "convert it to safetensors or pass --trust-pickle if you trust its source")
    try:
        return _load_pickle(path, device)
    except UserError:
        raise
    except Exception as exc:  # torch.load raises many types on a bad file
        raise UserError(f"{path}: could not load the pickle file ({type(exc).__name__}: {exc})") from None
