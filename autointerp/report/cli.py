"""`autointerp report RUN_DIR [--human FILE]`: the typer command around build_report."""

from __future__ import annotations

from pathlib import Path

import typer

from autointerp import run as runlib
from autointerp.options import contexts_option
from autointerp.report.build import DEFAULT_MAX_FEATURES, build_report, site_axis


def cli(
    run_dir: Path = typer.Argument(..., help="Run directory (e.g. runs/demo)."),
    human: Path | None = typer.Option(None, "--human", help="Human labels to compare with (any format "
                                      "`autointerp compare` reads, e.g. the dev file or annotate output)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default RUN_DIR/report)."),
    contexts: int = contexts_option(5),
    window: int = typer.Option(12, "--window", min=1, help="Tokens shown either side of a context's max token."),
    max_features: int | None = typer.Option(None, "--per-page", min=1,
                                            help="At most this many feature cards per checkpoint page: the "
                                                 "LLM-described latents first, then the others by feature id "
                                                 f"(default {DEFAULT_MAX_FEATURES}; without labels, records). "
                                                 "Shares always count every latent."),
) -> None:
    """Render the HTML report: RUN_DIR/report/index.html and one page per checkpoint (or layer)."""
    from autointerp.files import Kind, expect

    expect(run_dir, Kind.RUN)
    index = build_report(run_dir, human, out, contexts, window, max_features)
    pages = [index.parent / f"{site.name}.html" for site in runlib.sites(run_dir)]
    pages = [p for p in pages if p.exists()]
    size = sum(p.stat().st_size for p in [index, *pages]) / 1e6
    kind = "layer" if site_axis(runlib.sites(run_dir)) == "layer" else "checkpoint"
    print(f"wrote {index} and {len(pages)} {kind} pages ({size:.1f} MB)")
