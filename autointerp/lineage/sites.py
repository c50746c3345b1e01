"""Feature lineage over a run: every consecutive pair of sites A -> B (checkpoints of one layer,
or the layers of one model: run.lineage_pairs) matched (lineage.match) over a shared token
sample (default: the documents `lm train` holds out), run through both sites' LM + SAE (the
layers of one model from one forward pass). Output per pair:

    RUN/B/lineage.jsonl       one line per latent of B that fires on the sample (feature,
                              parent_step, parent_layer, parent_feature, correlation, margin, new, ...)
    RUN/B/lineage.meta.json   sample size, null thresholds, settings (written last: "done")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import Progress

from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.jsonl import write_jsonl
from autointerp.lineage.match import Codes, lineage_pair
from autointerp.progress import progress_bar

console = Console(stderr=True)
META_FILE = "lineage.meta.json"
ROWS_FILE = "lineage.jsonl"


@dataclass
class SiteSAE:
    """What lineage needs of one site: its SAE and the LM it reads."""

    site: runlib.Site
    sae_dir: Path
    model: str
    revision: str | None
    layer: int

    @property
    def step(self) -> int | None:
        return self.site.step


def find_sites(run: Path) -> list[SiteSAE]:
    """Sites with an SAE and a reachable LM (RUN/lm/step-N, else the model in the SAE's config,
    as `collect` does); a one-line UserError when lineage cannot run on this run."""
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    found = runlib.sites(run)
    with_sae = [s for s in found if (runlib.site_dir(run, s) / "sae").is_dir()]
    if not with_sae:
        if any(runlib.records_file(runlib.site_dir(run, s)).exists() for s in found):
            raise UserError(f"{run}: lineage cannot run on feature records alone (imported records?): it runs the "
                            "same tokens through each site's LM and SAE, and this run has no step-N/sae or layer-L/sae")
        raise UserError(f"{run}: no step-N/sae or layer-L/sae folders (train SAEs first: autointerp sae train {run})")
    out = []
    for site in with_sae:
        sae_dir = runlib.site_dir(run, site) / "sae"
        cfg_path = sae_dir / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        lm_dir = runlib.lm_checkpoint_dir(run, site.step) if site.step is not None else None
        own_lm = lm_dir is not None and lm_dir.is_dir()
        model = str(lm_dir) if own_lm else runlib.resolve_model(cfg.get("model"), sae_dir)
        if not model:
            raise UserError(f"{sae_dir}: no LM for {site.title} (no RUN/lm/step-N and the SAE config names no model), "
                            "so lineage cannot run its tokens through it")
        if cfg.get("layer") is None:
            raise UserError(f"{sae_dir}: the SAE config names no layer")
        out.append(SiteSAE(site, sae_dir, model, None if own_lm else cfg.get("revision"), int(cfg["layer"])))
    if len(out) < 2:
        raise UserError(f"{run}: lineage needs at least two checkpoints or layers with an SAE (found {len(out)})")
    return out


def shared_documents(corpus: str, sample: str, max_docs: int | None):
    from autointerp.lm.corpus import load_corpus
    from autointerp.lm.train import is_eval_doc

    docs = load_corpus(corpus)
    if sample == "eval":
        docs = [d for d in docs if is_eval_doc(d)]
    elif sample != "all":
        raise UserError(f"--sample must be eval or all, not {sample!r}")
    docs = docs[:max_docs] if max_docs else docs
    if not docs:
        raise UserError(f"corpus {corpus!r} has no {'held-out ' if sample == 'eval' else ''}documents to share")
    return docs


@torch.inference_mode()
def encode_sites(sites: Sequence[SiteSAE], docs, seq_len: int, batch_size: int, device: str,
                 progress: Progress | None = None) -> tuple[dict[runlib.Site, Codes], torch.Tensor]:
    """({site: codes}, token ids) of the shared documents' first `seq_len` tokens through the
    sites' LM + SAEs: sites that read one LM (its layers) share one forward pass."""
    from autointerp.lm.activations import iter_activations, load_lm
    from autointerp.sae import load_sae

    if len({(s.model, s.revision) for s in sites}) != 1 or len({s.layer for s in sites}) != len(sites):
        raise ValueError("encode_sites takes the SAEs of one LM at distinct layers")
    saes = {s.layer: load_sae(s.sae_dir, device=device) for s in sites}
    model, tokenizer = load_lm(sites[0].model, revision=sites[0].revision, device=device)
    title = ", ".join(s.site.title for s in sites)
    task = progress.add_task(f"encode {title}", total=len(docs)) if progress else None
    values: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    indices: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    tokens = []
    for batch in iter_activations(model, tokenizer, docs, list(saes), batch_size=batch_size, max_tokens=seq_len,
                                  device=device):
        for layer, sae in saes.items():
            v, i = sae.encode(batch.by_layer[layer][batch.mask].to(device))
            values[layer].append(v.float().cpu())
            indices[layer].append(i.to(torch.int32).cpu())
        tokens.append(batch.input_ids[batch.mask])
        if progress is not None:
            progress.update(task, advance=len(batch.doc_ids))
    codes = {s.site: Codes(torch.cat(values[s.layer]), torch.cat(indices[s.layer]), int(saes[s.layer].cfg.d_sae))
             for s in sites}
    return codes, torch.cat(tokens)


def encode_checkpoint(ckpt: SiteSAE, docs, seq_len: int, batch_size: int, device: str,
                      progress: Progress | None = None) -> tuple[Codes, torch.Tensor]:
    """(codes, token ids) of one site (encode_sites for one)."""
    codes, tokens = encode_sites([ckpt], docs, seq_len, batch_size, device, progress)
    return codes[ckpt.site], tokens


def _settings(corpus: str, sample: str, max_docs: int | None, seq_len: int, quantile: float, bins: int,
              seed: int) -> dict[str, Any]:
    return {"corpus": corpus, "sample": sample, "max_docs": max_docs, "seq_len": seq_len, "quantile": quantile,
            "bins": bins, "seed": seed}


def run_lineage(run: Path, corpus: str | None = None, sample: str = "eval", max_docs: int | None = None,
                seq_len: int = 64, quantile: float = 0.99, bins: int = 10, seed: int = 0, batch_size: int = 32,
                device: str = "cpu", force: bool = False, group_bytes: int = 16 << 20) -> list[dict[str, Any]]:
    """Write SITE/lineage.jsonl + lineage.meta.json for every consecutive pair of sites; return the metas."""
    found = {s.site: s for s in find_sites(run)}
    corpus = corpus or runlib.load_saved((runlib.read_manifest(run).get("stages", {}).get("sae", {}) or {}).get("corpus"),
                                         run) or "debian-reference"
    settings = _settings(corpus, sample, max_docs, seq_len, quantile, bins, seed)
    pairs = [(found[a], found[b]) for a, b in runlib.lineage_pairs(list(found))]
    todo = []
    for a, b in pairs:
        folder = runlib.site_dir(run, b.site)
        meta_path = folder / META_FILE
        done = meta_path.exists() and (folder / ROWS_FILE).exists()
        if done and not force and json.loads(meta_path.read_text()).get("settings") == settings:
            console.print(f"[dim]{a.site.title} -> {b.site.title}: done ({meta_path}); --force to redo[/]")
            continue
        todo.append((a, b))
    if not todo:
        return [json.loads((runlib.site_dir(run, b.site) / META_FILE).read_text()) for _, b in pairs]
    docs = shared_documents(corpus, sample, max_docs)
    cache: dict[runlib.Site, tuple[Codes, torch.Tensor]] = {}
    metas = []
    with progress_bar(console=console) as progress:
        for a, b in todo:
            for one in (a, b):
                if one.site not in cache:
                    # every site still to match that reads the same LM comes from this one pass
                    group = [s for s in found.values() if (s.model, s.revision) == (one.model, one.revision)
                             and s.site not in cache and any(s in pair for pair in todo)]
                    codes, tokens = encode_sites(group, docs, seq_len, batch_size, device, progress)
                    cache.update({site: (c, tokens) for site, c in codes.items()})
            (codes_a, tok_a), (codes_b, tok_b) = cache[a.site], cache[b.site]
            if not torch.equal(tok_a, tok_b):
                raise UserError(f"{a.site.title} and {b.site.title} tokenize the shared documents differently; "
                                "lineage compares activations token by token, so both need the same tokenizer")
            task = progress.add_task(f"match {a.site.title} -> {b.site.title} (+ null)", total=None)

            def on_group(done: int, total: int, task=task) -> None:
                progress.update(task, total=2 * total, advance=1)

            result = lineage_pair(codes_a, codes_b, a.step, b.step, quantile, bins, seed, group_bytes, on_group,
                                  layer_a=a.layer, layer_b=b.layer)
            folder = runlib.site_dir(run, b.site)
            write_jsonl(folder / ROWS_FILE, result.rows)
            meta = {**result.meta, "parent_site": a.site.name, "site": b.site.name, "settings": settings,
                    "docs": len(docs)}
            tmp = folder / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2))
            tmp.replace(folder / META_FILE)
            metas.append(meta)
            later = {s for pair in todo[todo.index((a, b)) + 1:] for s in (pair[0].site, pair[1].site)}
            for site in [s for s in cache if s not in later]:
                del cache[site]  # codes no later pair needs
            progress.console.print(
                f"{a.site.title} -> {b.site.title}: {meta['live_b']} latents of {b.site.title} fire on "
                f"{meta['tokens']:,} shared tokens; {meta['continued']} continue a latent of {a.site.title}, "
                f"{meta['new']} are new (null threshold {_threshold_range(meta)}); {meta['seconds']:.1f} s")
    runlib.update_manifest(run, "lineage", {**settings, "pairs": [
        {k: m.get(k) for k in ("parent_step", "checkpoint_step", "parent_layer", "layer", "tokens", "live_b",
                               "continued", "new", "seconds")}
        for m in metas]})
    return metas


def _threshold_range(meta: dict[str, Any]) -> str:
    values = [b["threshold"] for b in meta["null"]["bins"]]
    if not values:
        return "-"
    return f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f} by firing band"
