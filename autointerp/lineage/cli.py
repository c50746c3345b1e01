"""The `lineage` command:

    autointerp lineage RUN [--sample eval|all] [--quantile 0.99]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import typer

from autointerp import options as O
from autointerp.files import Kind, expect
from autointerp.lineage.match import pair_title
from autointerp.lineage.sites import run_lineage


def _eval_or_all(value: str) -> str:
    if value not in ("eval", "all"):
        raise typer.BadParameter(f"{value!r} is not one of 'eval', 'all'.")
    return value


def _null_quantile(value: float) -> float:
    if not 0.5 <= value < 1:
        raise typer.BadParameter(f"{value} is not in [0.5, 1).")
    return value


def cli(
    run: Path = typer.Argument(..., metavar="RUN_DIR",
                               help="Run folder with step-N/sae (or layer-L/sae) and their LM (RUN_DIR/lm/step-N or "
                                    "the SAE config's model)."),
    corpus: str | None = O.corpus_option(None, "Default: the one the SAEs were trained on."),
    sample: str = typer.Option("eval", "--sample", metavar="eval|all", callback=_eval_or_all,
                               help="Shared documents: eval (held out by `lm train`) or all."),
    max_docs: int | None = O.docs_option(),
    seq_len: int = typer.Option(64, "--seq-len", min=1, help="First tokens of each document (as for the SAEs and records)."),
    quantile: float = typer.Option(0.99, "--quantile", callback=_null_quantile,
                                   help="A match counts when it beats this quantile of the shuffled-token null "
                                        "(per firing band); in [0.5, 1)."),
    bins: int = typer.Option(10, "--bins", min=1, help="Firing-frequency bands of the null threshold."),
    seed: int = O.seed_option("the token shuffle (the null)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents (sequences) per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (for the LM and SAE; matching runs on CPU)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)."),
    memory_mb: int = typer.Option(16, "--block-mb", min=1, help="Size of one block of the correlation matrix (MB); the whole matrix is never held."),
    force: bool = typer.Option(False, "--force", help="Redo pairs whose lineage.jsonl exists with the same settings."),
) -> None:
    """Match every latent of each checkpoint (layer) to its parent at the previous one (feature lineage)."""
    expect(run, Kind.RUN)
    if threads:
        torch.set_num_threads(threads)
    metas = run_lineage(run, corpus, sample, max_docs, seq_len, quantile, bins, seed, batch_size, device, force,
                        memory_mb << 20)
    for m in metas:
        print(f"{pair_title(m)}: {m['continued']} continued, {m['new']} new "
              f"of {m['live_b']} live ({m['tokens']:,} tokens); median best correlation "
              f"{m['real_best_corr_quantiles'].get('median', math.nan):.3f} "
              f"(shuffled-token null: {m['null']['best_corr_quantiles'].get('median', math.nan):.3f})")
