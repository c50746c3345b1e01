"""`autointerp sae train` and `autointerp sae metrics`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import typer
from rich.console import Console
from rich.progress import Progress

from autointerp import options as O
from autointerp import run as rundir
from autointerp.errors import UserError
from autointerp.files import Kind, expect
from autointerp.options import parse_steps
from autointerp.progress import progress_bar
from autointerp.sae.io import load_sae, save_sae
from autointerp.sae.metrics import (LEGACY_KEYS, MetricsConfig, measure_sae, metrics_table, special_token_ids,
                                    token_batches, write_metrics)
from autointerp.sae.model import SAEConfig, TopKSAE
from autointerp.sae.train import TrainConfig, train_sae

cli = typer.Typer(help="Train TopK sparse autoencoders and measure them.", no_args_is_help=True)
console = Console(width=max(Console().width, 160))  # the metrics table needs ~150 columns; piped output is 80



def _split_docs(corpus: str, limit: int | None, eval_docs: int):
    from autointerp.lm.corpus import load_corpus
    from autointerp.lm.train import is_eval_doc  # the documents `lm train` holds out

    docs = load_corpus(corpus, limit=limit)
    if not docs:
        raise UserError(f"corpus {corpus!r} has no documents")
    train = [d for d in docs if not is_eval_doc(d)]
    held = [d for d in docs if is_eval_doc(d)][:eval_docs]
    return train, held or train[:eval_docs]


def activation_chunks(model, tokenizer, docs, layer: int, seq_len: int, epochs: int,
                       cache_bytes: int = 2 << 30, shard: bool = False) -> Iterator[torch.Tensor]:
    """The masked token activations of every document, `epochs` times over.

    The first pass runs the LM; later passes replay it from memory when it fits in
    `cache_bytes`, else they run the LM again (it is deterministic). shard=True under torchrun:
    each rank runs the LM on its share of the batches and the ranks exchange the activations,
    so every rank yields the whole stream in single-process order (autointerp.distributed).
    """
    from autointerp.distributed import gathered_rounds, rank_world
    from autointerp.lm.activations import iter_activations

    rank, world = rank_world() if shard else (0, 1)
    cache: list[torch.Tensor] | None = []
    size = 0
    for epoch in range(epochs):
        if epoch > 0 and cache is not None:
            yield from cache
            continue
        local = (b.acts[b.mask] for b in iter_activations(model, tokenizer, docs, layer, batch_size=32,
                                                          max_tokens=seq_len,
                                                          shard=(rank, world) if world > 1 else None))
        for acts in gathered_rounds(local) if world > 1 else local:
            if cache is not None:
                size += acts.numel() * acts.element_size()
                cache = cache + [acts] if size <= cache_bytes else None
            yield acts


def _layer_activations(model, tokenizer, docs, layers: list[int], seq_len: int,
                       cache_bytes: int) -> dict[int, list[torch.Tensor]] | None:
    """Every layer's masked token activations from one pass of the LM over `docs`, held in
    memory; None when they would pass `cache_bytes` (the caller then runs a pass per layer)."""
    from autointerp.lm.activations import d_model, iter_activations

    tokens = sum(min(len(ids), seq_len) for ids in tokenizer([d.text for d in docs], truncation=True,
                                                             max_length=seq_len)["input_ids"])
    if tokens * d_model(model) * 4 * len(layers) > cache_bytes:
        return None
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with progress_bar(console=console, transient=True) as progress:
        task = progress.add_task("activations of layers " + ", ".join(map(str, layers)), total=len(docs))
        for batch in iter_activations(model, tokenizer, docs, layers, batch_size=32, max_tokens=seq_len):
            for layer in layers:
                out[layer].append(batch.by_layer[layer][batch.mask])
            progress.advance(task, len(batch.doc_ids))
    return out


def _replayed(chunks: list[torch.Tensor], epochs: int) -> Iterator[torch.Tensor]:
    for _ in range(epochs):
        yield from chunks


def measure(sae: TopKSAE, model, tokenizer, docs, layer: int, cfg: MetricsConfig) -> dict:
    """SAELens's metrics (and autointerp's own) of `sae` on `docs` (held-out documents)."""
    from autointerp.lm.activations import d_model

    if d_model(model) != sae.cfg.d_model:
        raise UserError(f"the SAE has d_model {sae.cfg.d_model} but the model's layers have {d_model(model)}")
    metrics = measure_sae(sae, model, layer, token_batches(tokenizer, [d.text for d in docs], cfg),
                          special_token_ids(tokenizer))
    metrics["eval_docs"] = len(docs)
    return metrics


def _init_distributed() -> tuple[int, int]:
    from autointerp.distributed import init_from_env

    return init_from_env()


def _train_one(model_path: str, revision: str | None, layers: list[int | None], step: int | None,
               outs: list[Path], train_docs, eval_docs, args: dict, progress: Progress | None, rank: int,
               saved_model: str | None = None) -> list[dict]:
    """Train one SAE per layer of one LM (checkpoint), each into its folder; several layers
    share one pass of the LM over the corpus when their activations fit in memory."""
    from autointerp.lm.activations import check_layer, d_model, load_lm, num_layers

    model, tokenizer = load_lm(model_path, revision=revision, device=args["device"])
    layers = [num_layers(model) // 2 if layer is None else layer for layer in layers]
    for layer in layers:
        check_layer(model, layer)
    d = d_model(model)
    budget = args["max_tokens"]
    epochs = args["epochs"] if budget is None else 10_000  # with a token budget: cycle until it is spent
    _, world = _init_distributed()
    cached = _layer_activations(model, tokenizer, train_docs, layers, args["seq_len"], args["cache_bytes"]) \
        if len(layers) > 1 and world == 1 else None
    results = []
    for layer, out in zip(layers, outs):
        # saved_model: how config.json names the model (relative to the SAE folder inside a run)
        sae_cfg = SAEConfig(d_model=d, d_sae=d * args["expansion"], k=args["k"], model=saved_model or model_path,
                            revision=revision, layer=layer, checkpoint_step=step)
        train_cfg = TrainConfig(batch_size=args["batch_size"], lr=args["lr"], warmup_frac=args["warmup"],
                                decay_frac=args["decay"], max_tokens=budget, auxk_alpha=args["auxk_alpha"],
                                dead_tokens=args["dead_tokens"], seed=args["seed"], device=args["device"])
        name = out.parent.name if out.name == "sae" else str(out)
        task = progress.add_task(f"SAE {name}", total=budget) if progress else None

        def on_step(_step: int, tokens: int, logs: dict, task=task, name=name) -> None:
            if progress is not None:
                progress.update(task, completed=tokens,
                                description=f"SAE {name} fvu={logs['fvu']:.3f} dead={logs['dead_fraction']:.0%}")

        chunks = _replayed(cached.pop(layer), epochs) if cached else \
            activation_chunks(model, tokenizer, train_docs, layer, args["seq_len"], epochs, shard=True)
        try:
            sae, result = train_sae(chunks, sae_cfg, train_cfg, on_step=on_step)
        finally:
            chunks.close()  # a budget can end mid-pass: this removes the extractor's layer hook now
        if progress is not None:
            progress.update(task, total=result.tokens, completed=result.tokens)
        if rank != 0:
            results.append({})
            continue
        metrics = measure(sae, model, tokenizer, eval_docs, layer,
                          MetricsConfig(eval_docs=len(eval_docs), seq_len=args["seq_len"]))
        metrics.update({"train_tokens": result.tokens, "train_steps": result.steps,
                        "train_seconds": round(result.seconds, 2),
                        "train_tokens_per_second": round(result.tokens / max(result.seconds, 1e-9)),
                        "train_dead_fraction": result.dead_fraction, "layer": layer, "checkpoint_step": step,
                        "train_config": train_cfg.__dict__, "history": result.history})
        save_sae(sae, out)
        write_metrics(out, metrics)  # written last: its presence marks the SAE done
        results.append(metrics)
    return results


def _check_same_settings(sae_dir: Path, layer: int | None, k: int, expansion: int) -> None:
    """A finished SAE is only reused if it was trained with the settings asked for now."""
    done = json.loads((sae_dir / "config.json").read_text())
    wanted = {"k": k, "expansion": expansion, **({"layer": layer} if layer is not None else {})}
    have = {"k": done.get("k"), "expansion": done.get("d_sae", 0) // max(done.get("d_model", 1), 1),
            "layer": done.get("layer")}
    diff = [f"{key} {have[key]} (asked {value})" for key, value in wanted.items() if have[key] != value]
    if diff:
        raise UserError(f"{sae_dir} was trained with {', '.join(diff)}; pass --force to retrain "
                        "or use another run directory")


@cli.command()
def train(
    run: Path = typer.Argument(None, metavar="RUN_DIR",
                               help="Run folder: one SAE per RUN_DIR/lm/step-N into RUN_DIR/step-N/sae/; with "
                                    "--model, one per layer of that model into RUN_DIR/layer-L/sae/."),
    model: str = O.model_option("Without RUN_DIR: one SAE into --out."),
    revision: str = O.revision_option(),
    layers: list[str] = typer.Option([], "--layer", metavar="LAYERS", callback=parse_steps,
                                     help="Decoder layer(s) whose output the SAE reads (0-based; default: the middle "
                                          "one); several, comma-separated (3,9,15), train an SAE each from one pass "
                                          "of the LM into site folders layer-L (or step-N-layer-L)."),
    corpus: str = O.corpus_option(),
    docs: int = O.docs_option(),
    out: Path = typer.Option(None, metavar="SAE_DIR", help="Output folder for --model (default: ./sae)."),
    force: bool = typer.Option(False, "--force", help="Retrain SAEs that are already done."),
    k: int = typer.Option(32, min=1, help="Active latents per token (TopK)."),
    expansion: int = typer.Option(16, min=1, help="Latents = expansion x d_model."),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", min=1, help="Tokens per optimizer step."),
    lr: float = typer.Option(1e-3, min=0.0, help="Adam learning rate."),
    warmup: float = typer.Option(0.0, min=0.0, max=1.0, help="Linear LR warm-up over this fraction of the steps."),
    decay: float = typer.Option(0.0, min=0.0, max=1.0, help="Linear LR decay to 0 over this last fraction of the steps."),
    train_tokens: int = typer.Option(1_000_000, "--train-tokens", min=0,
                                     help="Training tokens per SAE in all (the corpus is cycled); 0 = --epochs."),
    epochs: int = typer.Option(1, min=1, help="Passes over the corpus when --train-tokens is 0."),
    seq_len: int = typer.Option(64, min=1, help="First tokens of each document (the paper: 64)."),
    auxk_alpha: float = typer.Option(1 / 32, min=0.0, help="Weight of the AuxK loss for dead latents (0 = off)."),
    dead_tokens: int = typer.Option(250_000, min=1, help="A latent is dead after this many tokens without firing."),
    eval_docs: int = typer.Option(MetricsConfig.eval_docs, min=1, help="Held-out documents for the metrics."),
    seed: int = O.seed_option("the SAE's init and the shuffle"),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = typer.Option(None, min=1, help="Torch CPU threads (default: torch's choice)."),
    cache_gb: float = typer.Option(6.0, "--cache-gb", min=0.0,
                                   help="Memory for the activations several layers share (beyond it: a pass per layer)."),
) -> None:
    """Train TopK SAE(s), write sae.safetensors + config.json + metrics.json, print the metrics table."""
    if model is None and run is None:
        raise UserError("give RUN_DIR (one SAE per checkpoint, or per layer with --model) or --model (one SAE)")
    wanted: list[int | None] = list(layers) or [None]
    layer = wanted[0] if len(wanted) == 1 else None
    if run is not None and model is None:
        expect(run, Kind.RUN, what="RUN_DIR")
    if run is None and len(wanted) > 1:
        raise UserError("several layers need RUN_DIR: each SAE goes to RUN_DIR/layer-L/sae")
    if threads:
        torch.set_num_threads(threads)
    rank, world = _init_distributed()
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    args = dict(k=k, expansion=expansion, batch_size=batch_tokens, lr=lr, warmup=warmup, decay=decay,
                max_tokens=train_tokens or None, epochs=epochs, seq_len=seq_len, auxk_alpha=auxk_alpha,
                dead_tokens=dead_tokens, seed=seed, device=device, cache_bytes=int(cache_gb * 2**30))
    # jobs: (LM, revision, step, [(layer, SAE folder, row title)]); the layers of one job share the LM
    jobs: list[tuple[str, str | None, int | None, list[tuple[int | None, Path, str]]]] = []
    if run is not None and model is None:
        steps = rundir.lm_checkpoints(run)
        if not steps:
            raise UserError(f"{run}: no LM checkpoints in {run}/lm/step-N (run `autointerp lm train` first)")
        for s in steps:
            sites = [rundir.Site(s, one if len(wanted) > 1 else None) for one in wanted]
            jobs.append((str(rundir.lm_checkpoint_dir(run, s)), None, s,
                         [(one, rundir.site_dir(run, site) / "sae", site.title) for one, site in zip(wanted, sites)]))
    elif run is not None:
        if wanted == [None]:
            from autointerp.lm.activations import load_lm, num_layers

            wanted = [num_layers(load_lm(model, revision=revision)[0]) // 2]
        jobs.append((model, revision, None, [(one, rundir.site_dir(run, rundir.Site(layer=one)) / "sae", f"layer {one}")
                                             for one in wanted]))
    else:
        jobs.append((model, revision, None, [(layer, out or Path("sae"), str(out or Path("sae")))]))
    # config.json names the model relative to the SAE folder inside a run (the run can move),
    # else by its absolute path or hub id
    train_docs, held = _split_docs(corpus, docs, eval_docs)

    rows = []
    started = time.time()
    with progress_bar(console=console, disable=rank != 0) as progress:
        for model_path, rev, step, saes in jobs:
            todo = []
            for one, sae_dir, title in saes:
                if not force and (sae_dir / "metrics.json").exists() and (sae_dir / "sae.safetensors").exists():
                    _check_same_settings(sae_dir, one, k, expansion)
                    rows.append((title + " (done)", json.loads((sae_dir / "metrics.json").read_text())))
                else:
                    todo.append((one, sae_dir, title))
            if not todo:
                continue
            saved = rundir.saved_path(model_path, todo[0][1], root=run)
            results = _train_one(model_path, rev, [one for one, _, _ in todo], step, [d for _, d, _ in todo],
                                 train_docs, held, args, progress if rank == 0 else None, rank, saved_model=saved)
            rows += [(title, metrics) for (_, _, title), metrics in zip(todo, results)]
    if rank == 0:
        console.print(metrics_table(rows, title="SAE metrics (held-out documents)"))
        if run is not None:
            rundir.update_manifest(run, "sae", {**{k: v for k, v in args.items() if k != "cache_bytes"},
                                                "layer": layer, "layers": layers, "model": model and rundir.saved_path(model, run),
                                                "corpus": rundir.saved_path(corpus, run),
                                                "docs": docs,
                                                "world_size": world, "seconds": round(time.time() - started, 1)})
    if dist.is_initialized():
        from autointerp.distributed import leave
        leave()


@cli.command()
def metrics(
    sae_dir: Path = typer.Argument(..., metavar="SAE_DIR", help="SAE folder (any supported format) or its weights file."),
    model: str = O.model_option("Default: the model in the SAE's config."),
    revision: str = O.revision_option("Default: the SAE config's."),
    layer: int = typer.Option(None, min=0, help="Layer (default: the layer in the SAE's config)."),
    corpus: str = O.corpus_option(default_help="The evaluation documents come from it."),
    docs: int = O.docs_option(),
    eval_docs: int = typer.Option(MetricsConfig.eval_docs, min=1, help="Held-out documents to measure on."),
    seq_len: int = typer.Option(MetricsConfig.seq_len, min=1, help="First tokens of each document."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading .pt/.bin pickle files."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    write: bool = typer.Option(False, "--write/--no-write", help="Save the figures in SAE_DIR/metrics.json (our format only), "
                                                     "replacing its held-out metrics and keeping its training record."),
) -> None:
    """Measure an SAE by SAELens's definitions (explained variance, L0, dead latents, CE and KL scores) and
    print the table; metrics.json is only written with --write."""
    from autointerp.lm.activations import check_layer, load_lm

    expect(sae_dir, Kind.SAE)
    sae = load_sae(sae_dir, trust_pickle=trust_pickle, device=device)
    folder = sae_dir if sae_dir.is_dir() else sae_dir.parent
    ours = (folder / "config.json").exists() and (folder / "sae.safetensors").exists()
    if write and not ours:
        raise UserError(f"--write saves metrics.json next to an SAE in this project's format; {folder} is not one")
    model = model or rundir.resolve_model(sae.cfg.model, folder)
    layer = sae.cfg.layer if layer is None else layer
    if model is None or layer is None:
        raise UserError("this SAE's config does not say which model/layer it reads: pass --model and --layer")
    lm, tokenizer = load_lm(model, revision=revision or sae.cfg.revision, device=device)
    check_layer(lm, layer)
    cfg = MetricsConfig(eval_docs=eval_docs, seq_len=seq_len)
    _, held = _split_docs(corpus, docs, cfg.eval_docs)
    result = measure(sae, lm, tokenizer, held, layer, cfg)
    console.print(metrics_table([(str(sae_dir), result)]))
    console.print(f"{result['eval_tokens']:,} text tokens of {result['eval_docs']} held-out documents "
                  f"({result['ce_tokens']:,} with a next token for the CE loss)")
    if not write:
        console.print("metrics.json not written (pass --write to save these figures)")
        return
    path = folder / "metrics.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = {k: v for k, v in old.items() if k not in LEGACY_KEYS}
    write_metrics(folder, {**kept, **result})
    console.print(f"replaced the held-out metrics in {path} (its training record kept)" if old else f"wrote {path}")
