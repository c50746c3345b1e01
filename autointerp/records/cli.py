"""The `collect` and `records` commands: collect a run's (an SAE's) records; show and import records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import typer
from rich.console import Console
from rich.text import Text

from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.files import Kind, detect_kind, expect
from autointerp.jsonl import write_jsonl
from autointerp import options as O
from autointerp.records.collect import collect_progress, collect_records, console
from autointerp.records.read import find_records, stream_records
from autointerp.records.show import describe_record
from autointerp.schema import FeatureRecord


# --------------------------------------------------------------------------- collect

def parse_latents(spec: str | None) -> list[int] | None:
    """--latents: "N" (the first N latents), "A-B" (inclusive), or "a,b,c"; mixes allowed ("0-9,42")."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    spec = spec.strip()
    try:
        if spec.isdigit():
            return list(range(int(spec)))
        out: list[int] = []
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise UserError(f"--latents {spec!r}: expected N, A-B or a comma list of latent ids") from None
    return sorted(set(out))


def _latents_option(spec: str | None) -> str | None:
    """--latents N|A-B|a,b,c, checked when the command line is read."""
    try:
        parse_latents(spec)
    except UserError as exc:
        raise typer.BadParameter(str(exc).split(": ", 1)[-1]) from None
    return spec


def cli_collect(
    target: Path = typer.Argument(..., metavar="TARGET",
                                  help="A run folder (every RUN_DIR/SITE/sae into RUN_DIR/SITE/records.jsonl.zst; "
                                       "SITE is step-N or layer-L) "
                                       "or one SAE folder (with --out)."),
    model: str | None = O.model_option("Default: RUN_DIR/lm/step-N, else the SAE config's model."),
    revision: str | None = O.revision_option("Default: the SAE config's."),
    corpus: str = O.corpus_option(),
    out: Path | None = typer.Option(None, "--out", metavar="RECORDS",
                                    help="Output records file (for an SAE folder): .jsonl.zst (compact), .jsonl or .jsonl.gz."),
    layer: int | None = typer.Option(None, "--layer", min=0, help="Layer (default: the SAE config's)."),
    steps: list[str] = O.steps_option(f"For a run folder: only these checkpoint steps, {O.STEPS_HELP}."),
    top_k: int = typer.Option(50, "--top-k", min=1, help="Top contexts kept per latent (the true top-k by max activation)."),
    context_len: int = typer.Option(64, "--context-len", min=1,
                                    help="Tokens a stored context holds (centred on the max token when documents are longer)."),
    seq_len: int | None = typer.Option(None, "--seq-len", min=1, help="Tokens read from the start of each document (default: --context-len)."),
    n_docs: int | None = O.docs_option(),
    latents: str | None = typer.Option(None, "--latents", metavar="IDS", callback=_latents_option,
                                       help="Latents to record: N (the first N), A-B, or a,b,c. Default: all."),
    n_similar: int = typer.Option(10, "--n-similar", min=0, help="'similar' negatives per latent (ranked just below the top-k)."),
    n_random: int = typer.Option(20, "--n-random", min=0, help="'random' negatives per latent (contexts where it is silent)."),
    n_same_token: int = typer.Option(5, "--n-same-token", min=0, help="'same-token' negatives per latent (silent contexts holding its max token)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents per forward pass."),
    seed: int = O.seed_option("the random negatives"),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: cpu)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)."),
    force: bool = typer.Option(False, "--force", help="Recompute checkpoints whose records file exists."),
    on_error: str = O.on_error_option("A checkpoint that fails"),
) -> None:
    """Collect feature records: the true top-k contexts of every SAE latent, negatives, density.

    Under torchrun each rank runs the model on its share of the documents; rank 0 merges the
    per-rank top-k exactly and writes the records."""
    from autointerp.lm.corpus import load_corpus
    from autointerp.distributed import init_from_env

    if threads is not None:
        torch.set_num_threads(threads)
    expect(target, Kind.RUN, Kind.SAE, what="TARGET")
    run, sae = (None, target) if detect_kind(target) == Kind.SAE else (target, None)
    rank, world = init_from_env()
    if world > 1 and device and device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    opts = dict(top_k=top_k, window=context_len, max_tokens=seq_len, batch_size=batch_size, n_similar=n_similar,
                n_random=n_random, n_same_token=n_same_token, features=parse_latents(latents), seed=seed,
                device=device)
    jobs: list[tuple[Path, Path, str | None, int | None, str]] = []  # (sae dir, out, lm, step, site)
    if sae is not None:
        if out is None:
            raise UserError(f"{sae} is an SAE folder: give --out RECORDS for its records file")
        jobs.append((sae, out, model, None, str(sae)))
    else:
        assert run is not None
        wanted = set(steps) or None
        for site in runlib.sites(run):
            folder = runlib.site_dir(run, site)
            if not (folder / "sae").is_dir() or (wanted is not None and site.step not in wanted):
                continue
            lm_dir = runlib.lm_checkpoint_dir(run, site.step) if site.step is not None else None
            lm = model or (str(lm_dir) if lm_dir is not None and lm_dir.is_dir() else None)
            jobs.append((folder / "sae", runlib.records_file(folder), lm, site.step, site.name))
        if not jobs:
            raise UserError(f"{run}: no step-N/sae (or layer-L/sae) folders to collect from "
                            "(train SAEs first: autointerp sae train)")
    todo = [j for j in jobs if force or not j[1].exists()]
    for j in jobs:
        if j not in todo and rank == 0:
            console.print(f"[dim]{j[1]} exists; skipped (--force to redo)[/]")
    if not todo:
        return
    docs = load_corpus(corpus, limit=n_docs)
    if not docs:
        raise UserError(f"corpus {corpus!r} has no documents")
    # the sites of one LM checkpoint (its layers) share one pass of it
    groups: dict[tuple[str | None, int | None], list] = {}
    for job in todo:
        groups.setdefault((job[2], job[3]), []).append(job)
    done: dict[str, Any] = {}
    failed: list[str] = []
    with collect_progress(disable=rank != 0) as progress:
        for (lm, step), group in groups.items():
            try:
                results = collect_records([(j[0], j[1]) for j in group], lm, revision, docs, layer=layer, step=step,
                                          opts=opts, progress=progress, run=run)
                done.update({j[4]: r for j, r in zip(group, results)})
            except (UserError, OSError, ValueError, RuntimeError) as exc:
                names = ", ".join(str(j[0]) for j in group)
                if on_error == "fail":
                    raise UserError(f"{names}: {exc}") from None
                failed += [str(j[0]) for j in group]
                console.print(f"[red]{names}: {exc}[/] (skipped)")
    if run is not None and rank == 0:
        runlib.update_manifest(run, "collect", {"corpus": runlib.saved_path(corpus, run), "max_docs": n_docs,
                                                 "checkpoints": done, "world_size": world,
                                                 "failed": [runlib.saved_path(f, run) for f in failed], **{k: v for k, v in opts.items() if k != "features"},
                                                 "features": latents})
    message = f"{len(failed)} checkpoint(s) failed: {', '.join(failed)}" if failed else ""
    if world > 1:
        if message and rank == 0:
            console.print(f"[red]error:[/] {message}")
        from autointerp.distributed import leave
        leave(1 if failed else 0)
    if failed:
        raise UserError(message)


# --------------------------------------------------------------------------- records show, records import

cli_records = typer.Typer(help="Inspect and import feature records.", no_args_is_help=True)


@cli_records.command("show")
def show(
    file: Path = typer.Argument(..., metavar="RECORDS",
                                help="A records file (.jsonl, .jsonl.zst, .jsonl.gz), or an llm-jp-sae docs/data folder."),
    feature: int = typer.Option(..., "--feature", "-f", min=0, help="Latent id."),
    steps: list[str] = O.steps_option(f"Only these checkpoint steps, {O.STEPS_HELP} (needed when the file holds several)."),
    contexts: int = O.contexts_option(5),
    negatives: int = typer.Option(0, "--negatives", min=0, help="How many negatives to print."),
    on_error: str = O.on_error_option("A malformed line"),
) -> None:
    """Print a feature's top contexts with activation highlighting, its density and max activation."""
    expect(file, Kind.RECORDS, Kind.LLMJP_DEMO)
    out = Console(highlight=False, soft_wrap=True)
    matches = find_records(file, feature, None, on_error,
                           warn=lambda m: console.print(Text(m, style="yellow"), soft_wrap=True))
    if steps:
        matches = [r for r in matches if r.checkpoint_step in steps]
    if not matches:
        raise UserError(f"{file}: no feature {feature}" + (f" at steps {', '.join(map(str, steps))}" if steps else ""))
    if len(matches) > 1 and not steps:
        found = sorted({str(r.checkpoint_step) for r in matches})
        raise UserError(f"{file}: feature {feature} is at steps {', '.join(found)}; pick with --steps "
                        f"(e.g. --steps {found[-1]} or --steps {','.join(found)})")
    for record in matches:
        for item in describe_record(record, contexts, negatives):
            out.print(item)


@cli_records.command("import")
def import_(
    source: Path = typer.Argument(..., metavar="SOURCE",
                                  help="llm-jp-sae docs/data folder (or one step folder), or a records JSONL."),
    out: Path = typer.Option(..., "--out", metavar="RECORDS",
                             help="Output records file: .jsonl (plain), .jsonl.zst (compact) or .jsonl.gz."),
    on_error: str = O.on_error_option("A malformed line"),
) -> None:
    """Convert llm-jp-sae demo data or a records file (plain, .gz or .zst) into records JSONL,
    plain or compact by --out's name; streamed, so it also turns a compact file back into plain JSONL."""
    expect(source, Kind.RECORDS, Kind.LLMJP_DEMO)
    steps: set[int | None] = set()

    def seen(records: Iterable[FeatureRecord]) -> Iterator[FeatureRecord]:
        for r in records:
            steps.add(r.checkpoint_step)
            yield r

    n = write_jsonl(out, seen(stream_records(source, on_error,
                                             warn=lambda m: console.print(Text(m, style="yellow"), soft_wrap=True))))
    console.print(f"{out}: {n} records, steps {sorted(steps, key=lambda s: -1 if s is None else s)}")
