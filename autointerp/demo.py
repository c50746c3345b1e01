"""`autointerp demo`: the whole pipeline on the embedded default, no network and no GPU.

A tiny bilingual Llama trained from scratch on the parallel English/Japanese Debian
Reference, with checkpoints at log-spaced steps -> a TopK SAE per checkpoint -> feature
records -> feature lineage between consecutive checkpoints -> labels: a statistical label for
every live latent, and descriptions and scores from the embedded llama.cpp server
(SmolLM2-135M-Instruct) for a small sample per checkpoint, stratified by the statistical class,
with the shuffled-description control -> HTML reports. Each stage
is the same CLI command a user would run, so a stopped demo resumes where it stopped when
run again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from autointerp.errors import UserError
from autointerp.run import update_manifest

console = Console()


def stages(run: Path, layer: int, features: int, threads: int | None) -> list[tuple[str, list[str]]]:
    label = ["label", str(run), "--features", str(features)]
    if threads:
        label += ["--threads", str(threads)]
    return [
        ("train LM checkpoints", ["lm", "train", "--out", str(run / "lm")]),
        ("train SAE per checkpoint", ["sae", "train", str(run), "--layer", str(layer)]),
        ("collect feature records", ["collect", str(run)]),
        # all documents, not only the held-out ones: the embedded corpus holds out 136 documents
        # (7.9k tokens), on which ~28% of step 100's live latents never fire
        ("trace feature lineage", ["lineage", str(run), "--sample", "all"]),
        ("label every latent; describe and score a sample", label),
        ("render reports", ["report", str(run)]),
    ]


def cli(
    run: Path = typer.Argument(Path("runs/demo"), metavar="RUN_DIR", help="Run folder (created; reused to resume)."),
    layer: int = typer.Option(2, min=0, help="Decoder layer whose residual stream the SAE reads."),
    features: int = typer.Option(4, min=1, help="Latents per checkpoint the LLM describes and scores (a stratified "
                                                "sample; every live latent gets a statistical label). The LLM is "
                                                "the slow part on CPU: 4 keeps the demo within ~20 minutes."),
    threads: int = typer.Option(0, min=0, help="llama.cpp threads (0: all cores)."),
) -> None:
    """Run the whole pipeline on the embedded default and print where the report is."""
    timings: list[tuple[str, float]] = []
    for name, args in stages(run, layer, features, threads or None):
        console.rule(f"[bold]{name}[/]  [dim]autointerp {' '.join(args)}[/]")
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "autointerp.cli", *args])
        timings.append((name, time.perf_counter() - start))
        update_manifest(run, f"demo: {name}", {"command": "autointerp " + " ".join(args),
                                                "seconds": round(timings[-1][1], 1), "exit_code": rc})
        if rc != 0:
            raise UserError(f"stage '{name}' failed (exit {rc}); fix the cause and run `autointerp demo {run}` "
                            "again: finished stages are kept and skipped")
    table = Table(title="demo: time per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in timings:
        table.add_row(name, f"{seconds:.0f}")
    table.add_row("[bold]total[/]", f"[bold]{sum(s for _, s in timings):.0f}[/]")
    console.print(table)
    console.print(f"report: [bold]{(run / 'report' / 'index.html').resolve()}[/]")
