"""`autointerp label`: every live latent gets a label; an LLM describes and scores a sample.

    autointerp label RUN_DIR | RECORDS | STEP_DIR  [--features N|all] [--server URL --llm NAME]
    autointerp label SAE_DIR --model M [--revision R] --corpus C [--out RUN_DIR]

Per checkpoint:
1. statistical labels for every live latent (granularity, language, evidence, evidence
   summary), streamed through worker processes (autointerp/statlabels.py) into labels.jsonl;
2. the LLM sample: `--features N` live latents, seeded, stratified by the statistical class
   (every class present gets at least one; autointerp/sampling.py), or all of them;
3. explain (autointerp/explain.py) -> step-N/explanations.jsonl, then score
   (autointerp/score.py) -> step-N/scores.jsonl, both appended one latent at a time;
then once over all checkpoints the shuffled-description control (RUN/control.jsonl), whose
verdict decides whether the scores enter the granularity decision; and last labels.jsonl is
rewritten with the sample's lines carrying description, explainer and scores.

Resumable: explanations, scores and the control are appended as they finish and answers are
cached in RUN/cache.sqlite, so a stopped run sends only what is missing when run again; the
statistical labels are recomputed (seconds). The server is reached before anything heavy
loads: a server that is down is one line within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from autointerp import run as run_lib
from autointerp.labels import sampling
from autointerp.errors import UserError
from autointerp.files import Kind, detect_kind, expect
from autointerp.jsonl import iter_lines, write_jsonl
from autointerp.llm.vllm import VLLMConfig
from autointerp import options as O
from autointerp.progress import progress_bar
from autointerp.schema import GRANULARITIES, Key, row_key

PROBE_TIMEOUT = 3.0  # seconds for a server's /models to answer before the run is refused
DEFAULT_FEATURES = "100"  # the paper's people labelled 100 features per checkpoint


# ---- the server, before anything heavy ----------------------------------------------------------

def probe_server(url: str, timeout: float = PROBE_TIMEOUT) -> list:
    """The models (serve.ServedModel) a server lists at URL/models; a one-line UserError when it
    does not answer."""
    import httpx

    from autointerp.llm.serve import list_models

    try:
        return list_models(url, timeout)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = type(exc).__name__ if isinstance(exc, httpx.TimeoutException) else (str(exc) or type(exc).__name__)
        raise UserError(f"the LLM server at {url} does not answer ({reason}); start it (`autointerp serve`), "
                        "fix --server, or leave --server out to use an embedded server") from None


def context_window(asked: int | None, served: int | None, engine: str | None, console: Console) -> int:
    """The tokens per request the explainer fits its prompts to: the server's where it says
    (vLLM's max_model_len, llama.cpp's n_ctx), never more than it allows; else --n-ctx or the
    engine's default."""
    from autointerp.llm.serve import default_n_ctx

    if served is None:
        return asked or default_n_ctx(engine)
    if asked and asked > served:
        console.print(f"[yellow]--n-ctx {asked} is more than the server's {served} tokens per request: prompts are "
                      f"fitted to {served}[/]")
    return min(asked, served) if asked else served


# ---- what to label -------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """One records file's share of the work."""

    target: run_lib.Target
    classes: dict[Key, str] = field(default_factory=dict)  # live latent -> statistical class
    n_records: int = 0
    sample: list[Key] = field(default_factory=list)
    strata: dict[str, int] = field(default_factory=dict)
    records: list = field(default_factory=list)  # the sample's FeatureRecords
    stat_seconds: float = 0.0

    @property
    def labels_path(self) -> Path:
        return self.target.folder / "labels.jsonl"

    @property
    def name(self) -> str:
        return self.target.folder.name


def sae_run_folder(sae_dir: Path, out: Path | None) -> tuple[Path, Path]:
    """(run folder, records file) for labelling an SAE folder: its run's site records when the
    SAE sits in a run (RUN/step-N/sae, RUN/layer-L/sae), else --out or SAE_DIR-labels/ next to it."""
    sae_dir = sae_dir.resolve()
    step = sae_dir.parent
    if out is None and sae_dir.name == "sae" and run_lib.Site.parse(step.name):
        return step.parent, run_lib.records_file(step)
    folder = out if out is not None else sae_dir.parent / f"{sae_dir.name}-labels"
    return folder, run_lib.records_file(folder)


def collect_for_sae(sae_dir: Path, records_path: Path, model: str | None, revision: str | None, corpus: str,
                    console: Console) -> None:
    """Collect the SAE's feature records (records.py's collect, defaults as `autointerp collect`)."""
    from autointerp.lm.corpus import load_corpus
    from autointerp.records.collect import collect_progress, collect_records

    console.print(f"collecting the records of {sae_dir} over corpus {corpus!r} into {records_path}")
    docs = load_corpus(corpus)
    if not docs:
        raise UserError(f"corpus {corpus!r} has no documents")
    opts = dict(top_k=50, window=64, max_tokens=None, batch_size=32, n_similar=10, n_random=20, n_same_token=5,
                features=None, seed=0, device=None)
    with collect_progress() as progress:
        collect_records([(sae_dir, records_path)], model, revision, docs, layer=None, step=None, opts=opts,
                        progress=progress)


def stat_pass(cp: Checkpoint, progress: Progress | None = None, write: bool = True) -> None:
    """The statistical label of every live latent, streamed into labels.jsonl (written atomically),
    and each one's class for the stratified sample."""
    from autointerp.labels.statlabels import StatLabelCounts, iter_live_labels

    total = sum(1 for _ in iter_lines(cp.target.records_path, binary=True))
    task = progress.add_task(f"statistical labels {cp.name}", total=total) if progress else None
    counts = StatLabelCounts()

    def live_lines() -> Iterator[str]:
        for line, label in iter_live_labels(cp.target.records_path, counts):
            if progress is not None:
                progress.update(task, completed=counts.labelled + counts.dead)
            cp.classes[row_key(label)] = label.get("granularity") or "uninterpretable"
            yield line

    if write:
        write_jsonl(cp.labels_path, live_lines())
    else:
        for _ in live_lines():
            pass
    cp.n_records = counts.labelled + counts.dead  # the dead ones: n_records - len(classes)
    if progress is not None:
        progress.update(task, completed=cp.n_records)


def load_sample(cp: Checkpoint) -> None:
    """Parse the sampled latents' records only (a key scan finds them)."""
    from autointerp.records.lean import scan_records
    from autointerp.schema import FeatureRecord

    wanted = set(cp.sample)
    records = {}
    for key, _live, raw in scan_records(cp.target.records_path):
        if key in wanted:
            records[key] = FeatureRecord.from_dict(json.loads(raw))
    cp.records = [records[k] for k in cp.sample if k in records]


def previous_sample_done(cps: list[Checkpoint], manifest: dict[str, Any], features: str, seed: int,
                         no_score: bool) -> bool:
    """Whether an earlier run drew the same sample and explained (and scored) all of it: then no
    server is needed to rebuild the labels."""
    stage = manifest.get("stages", {}).get("label", {})
    if str(stage.get("features")) != str(features) or stage.get("sample", {}).get("seed") != seed:
        return False
    if not no_score and "control" not in stage:
        return False
    from autointerp.interp.explainer import load_finished as finished_explanations
    from autointerp.interp.score import load_finished as finished_scores

    for cp in cps:
        keys = set(sampling.labelled_sample(cp.labels_path))
        if not keys:
            return False
        if not keys <= finished_explanations(cp.target.folder / "explanations.jsonl").keys():
            return False
        if not no_score and not keys <= finished_scores(cp.target.folder / "scores.jsonl").keys():
            return False
    return True


# ---- the LLM stages ------------------------------------------------------------------------------

def _progress(console: Console) -> Progress:
    return progress_bar("{task.fields[rates]}", console=console)


def explain_sample(cp: Checkpoint, client, settings, console: Console, sending: bool = True) -> dict:
    from autointerp.interp.explainer import explain_records, load_finished, other_setup

    out = cp.target.folder / "explanations.jsonl"
    keys = {r.key for r in cp.records}
    written = load_finished(out)
    kept = other_setup((e for k, e in written.items() if k in keys), client, settings) if sending else 0
    if kept:
        console.print(f"[yellow]{cp.name}: {kept} description(s) kept from an earlier run with another prompt, "
                      f"request form or sampling; delete {out} to write them again[/]")
    start, finished = time.perf_counter(), [0]
    with _progress(console) as progress:
        task = progress.add_task(f"explain {cp.name}", total=len(cp.records), rates="",
                                 completed=len(written.keys() & keys))

        def on_done(_) -> None:
            finished[0] += 1
            dt = max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, rates=f"{finished[0] / dt:.2f} features/s  "
                                                   f"cache hits {client.stats.cache_hits}")

        explanations = explain_records(cp.records, client, out, settings, on_done=on_done)
    if line := trimmed_line(cp.name, explanations, settings):
        console.print(line)
    return {e.key: e for e in explanations}


def trimmed_line(name: str, explanations: list, settings) -> str | None:
    """How many of the explainer's prompts were trimmed to fit the server's context, and how far
    (None when none was)."""
    trimmed = [e for e in explanations if e.trimmed]
    if not trimmed:
        return None
    fewest = min(e.contexts or 0 for e in trimmed)
    return (f"[yellow]{name}: {len(trimmed)} of {len(explanations)} explainer prompts trimmed to fit "
            f"{settings.context_window} tokens a request, as few as {fewest} of the {settings.n_contexts} contexts "
            f"shown (or fewer tokens before each max); a longer context (--n-ctx, the server's) shows more[/]")


def score_sample(cp: Checkpoint, descriptions: dict, client, settings, console: Console) -> dict:
    from autointerp.interp import score

    out = cp.target.folder / "scores.jsonl"
    with _progress(console) as progress:
        pending = len(score.pending_keys(cp.records, descriptions, out))
        task = progress.add_task(f"score {cp.name}", total=len(cp.records), completed=len(cp.records) - pending,
                                 rates="")
        scores = score.score_records(cp.records, descriptions, client, out, settings,
                                     on_done=lambda _: progress.update(task, advance=1))
    console.print(score.summary_line(out, scores))
    return {s.key: s for s in scores}


def run_control(cps: list[Checkpoint], descriptions: dict, scores: dict, client, settings, console: Console,
                run_dir: Path):
    from autointerp.interp import control as shuffle_control

    records = [r for cp in cps for r in cp.records]
    ordered = [scores[r.key] for r in records if r.key in scores]
    planned, _, _ = shuffle_control.control_plan(records, descriptions, ordered, 0.2, 10, settings.seed)
    with _progress(console) as progress:
        task = progress.add_task("control (shuffled descriptions)", total=len(planned), rates="")
        control = shuffle_control.run_control(records, descriptions, ordered, client, run_dir / "control.jsonl",
                                              settings, seed=settings.seed,
                                              on_done=lambda _: progress.update(task, advance=1))
    shuffle_control.print_control(control, console)
    return control


def final_labels(cp: Checkpoint, explanations: dict, scores: dict, vouched: list[str]) -> None:
    """Rewrite labels.jsonl: the sample's lines with description, explainer and scores (the
    decision taking only the scores the control vouches for), the others as they are."""
    from autointerp.labels import decision as granularity

    models = granularity.load_models()
    by_key = {r.key: r for r in cp.records}

    def lines() -> Iterator[str]:
        for _, line in iter_lines(cp.labels_path):
            d = json.loads(line)
            key = row_key(d)
            record = by_key.get(key)
            if record is None:
                yield line
                continue
            yield granularity.label_record(record, explanations.get(key), scores.get(key), models,
                                           sampled=True, vouched=vouched)

    write_jsonl(cp.labels_path, lines())


def print_shares(cps: list[Checkpoint], console: Console) -> list[dict]:
    """Per checkpoint: the class shares over all latents with Wilson 95% intervals, the LLM
    sample's beside them, and whether they agree."""
    from autointerp.jsonl import iter_jsonl
    from autointerp.schema import Label
    from autointerp.labels.shares import ShareCounter, sample_agreement

    out = []
    for cp in cps:
        whole, part = ShareCounter("granularity"), ShareCounter("granularity", where=lambda l: l.sampled)
        for label in iter_jsonl(cp.labels_path, Label.from_dict):
            whole.add(label)
            part.add(label)
        all_table, sample_table = whole.table(), part.table()
        agreement = sample_agreement(all_table, sample_table, GRANULARITIES)
        table = Table(title=f"{cp.name}: granularity of {all_table.n} live latents (statistical) and of the "
                            f"{sample_table.n} sampled for the LLM", title_justify="left")
        for column in ("class", "all latents", "95% CI", "sample", "95% CI"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for row in agreement.classes:
            a, s = row.all, row.sample
            table.add_row(str(row.name), f"{a.count} ({a.share:.1%})", f"{a.lo:.1%}–{a.hi:.1%}",
                          f"{s.count} ({s.share:.0%})", f"{s.lo:.0%}–{s.hi:.0%}")
        console.print(table)
        console.print(f"  {agreement.summary()}")
        out.append({"step": cp.name, "all": all_table.to_dict(GRANULARITIES),
                    "sample": sample_table.to_dict(GRANULARITIES), "agreement": agreement.to_dict()})
    return out


# ---- the command ---------------------------------------------------------------------------------

def cli(
    target: Path = typer.Argument(..., metavar="TARGET",
                                  help="A run folder (every step-N/records file), a checkpoint folder, a records file, "
                                       "or an SAE folder (its records are collected first when missing)."),
    model: str = O.model_option("With an SAE folder; default: the SAE config's."),
    revision: str = O.revision_option("With an SAE folder; default: the SAE config's."),
    corpus: str = O.corpus_option(default_help="With an SAE folder: the corpus its records are collected over."),
    out: Path = typer.Option(None, "--out", metavar="RUN_DIR",
                             help="With an SAE folder: the run folder for its records and labels "
                                  "(default: SAE_DIR-labels/ beside it, or the SAE's own run)."),
    llm: str = O.llm_option(),
    server: str = O.server_option(),
    engine: str = O.engine_option(),
    features: str = O.features_option("the LLM describes and scores (every live latent gets a statistical label either way)", DEFAULT_FEATURES),
    seed: int = O.seed_option("the sample, the scorers' example draws and the control"),
    concurrency: int = O.concurrency_option(),
    threads: int = O.llm_threads_option(),
    n_ctx: int = O.n_ctx_option(),
    vllm_python: str = O.vllm_python_option(),
    contexts: int = O.contexts_option(10, " to the explainer (fewer when they do not fit)"),
    window: int = typer.Option(6, "--window", min=0, help="Tokens shown before each snippet's max-activating token."),
    timeout: float = O.timeout_option(),
    retries: int = O.retries_option(),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the first prompt and the request counts; write "
                                                          "and send nothing."),
    no_score: bool = typer.Option(False, "--no-score", help="Describe the sample but do not score it (no control)."),
) -> None:
    """Label every live latent: a statistical label for all, an LLM description and scores for a
    stratified sample, the shuffled-description control, then the class shares with 95% intervals.
    Writes step-N/labels.jsonl (one line per live latent), explanations.jsonl, scores.jsonl,
    RUN/control.jsonl. Scorer example counts by engine: vllm 50 + 50 (delphi's), else 10 + 10."""
    console = Console(stderr=True, soft_wrap=True)  # paths stay whole, to copy
    started = time.perf_counter()
    kind = detect_kind(target)
    sae_dir = None
    if kind == Kind.SAE:
        sae_dir = target if target.is_dir() else target.parent
        run_dir, records_path = sae_run_folder(sae_dir, out)
        targets = [run_lib.Target(records_path, records_path.parent, run_dir)]
    else:
        expect(target, Kind.RUN, Kind.CHECKPOINT, Kind.RECORDS, Kind.SAE,
               expected="a run folder, a checkpoint folder, feature records or an SAE folder")
        if out is not None:
            raise UserError("--out applies to an SAE folder only (labels are written beside the records)")
        targets = run_lib.resolve_targets(target)
    run_dir = targets[0].run_dir
    for folder in {t.folder for t in targets} | {run_dir}:
        if folder.exists() and not os.access(folder, os.W_OK):
            raise UserError(f"{folder} is not writable: labels are written beside the records; copy them into a "
                            "folder of your own (e.g. RUN/step-N/records.jsonl)")
    cps = [Checkpoint(t) for t in targets]
    manifest = run_lib.read_manifest(run_dir)
    # a server is needed unless nothing will be sent: a dry run, or a rebuild of a finished sample
    needed = not dry_run and (not all(t.records_path.is_file() for t in targets)
                              or not previous_sample_done(cps, manifest, features, seed, no_score))
    from autointerp.llm.serve import endpoint

    served_ctx = None
    if needed and server:
        listed = probe_server(server)  # before anything heavy: a down server is one line now
        llm = llm or (listed[0].id if listed else None)
        if not llm:
            raise UserError(f"the server at {server} lists no model; pass --llm NAME")
        from autointerp.llm.serve import server_context

        served_ctx = server_context(server, listed, llm)
    n_ctx = context_window(n_ctx, served_ctx, engine, console)
    vllm = VLLMConfig(python=vllm_python) if vllm_python else None
    with endpoint(server, llm, engine, threads, n_ctx, needed, vllm=vllm) as (url, llm_name, engine_name, check_alive):
        if sae_dir is not None and not targets[0].records_path.is_file():
            collect_for_sae(sae_dir, targets[0].records_path, model, revision, corpus, console)
        elif sae_dir is not None:
            console.print(f"{targets[0].records_path}: records of {sae_dir} exist; labelling them")
        if sae_dir is not None:
            console.print(f"labels go to {targets[0].folder / 'labels.jsonl'} (run folder {run_dir})")
        _label(cps, run_dir, url, llm_name, engine_name, check_alive, needed, console, features=features, seed=seed,
               concurrency=concurrency, n_ctx=n_ctx, contexts=contexts, window=window, timeout=timeout,
               retries=retries, dry_run=dry_run, no_score=no_score, started=started)


def _label(cps: list[Checkpoint], run_dir: Path, url: str, llm_name: str, engine: str, check_alive, needed: bool,
           console: Console, *, features: str, seed: int, concurrency: int, n_ctx: int, contexts: int, window: int,
           timeout: float, retries: int, dry_run: bool, no_score: bool, started: float) -> None:
    from autointerp.interp import score
    from autointerp.interp.explainer import ExplainSettings
    from autointerp.llm.client import LLMClient

    count = sampling.parse_count(features)
    with progress_bar(console=console) as progress:
        for cp in cps:
            t0 = time.perf_counter()
            stat_pass(cp, progress, write=not dry_run)
            cp.stat_seconds = time.perf_counter() - t0
    for cp in cps:
        cp.sample, cp.strata = sampling.sample_stratified(cp.classes, count, seed)
        rate = cp.n_records / max(cp.stat_seconds, 1e-9)
        console.print(f"{cp.name}: {len(cp.classes)} live latents labelled statistically, "
                      f"{cp.n_records - len(cp.classes)} dead counted apart ({rate:,.0f} features/s); LLM sample {len(cp.sample)} "
                      f"({', '.join(f'{c} {n}' for c, n in cp.strata.items())})"
                      + (f"; --features {count} is fewer than the {len(cp.strata)} classes present: one of each"
                         if count is not None and count < len(cp.strata) else ""))
        load_sample(cp)
    explain_settings = ExplainSettings(n_contexts=contexts, window=window, context_window=n_ctx, engine=engine)
    if dry_run:
        _dry_run(cps, explain_settings, no_score)
        return
    score_settings = score.ScoreSettings.for_engine(engine, seed=seed)
    client = LLMClient(url, llm_name, cache_path=run_dir / "cache.sqlite", concurrency=concurrency, timeout=timeout,
                       max_retries=retries, check_alive=check_alive, seed=seed)
    if needed:
        console.print(f"describing {sum(len(cp.records) for cp in cps)} latents in {len(cps)} SAE(s) "
                      f"with {llm_name} at {url}")
    else:
        console.print("the sample is already described and scored: no server needed, rebuilding labels")
    explanations: dict = {}
    scores: dict = {}
    control = None
    try:
        for cp in cps:
            explanations |= explain_sample(cp, client, explain_settings, console, sending=needed)
            if not no_score:
                descriptions = {k: explanations[k].description for k in (r.key for r in cp.records)}
                scores |= score_sample(cp, descriptions, client, score_settings, console)
        if not no_score and scores:
            descriptions = {k: e.description for k, e in explanations.items()}
            control = run_control(cps, descriptions, scores, client, score_settings, console, run_dir)
    finally:
        stats = client.stats.to_dict()
        client.close()
    vouched = control.vouched if control is not None else []
    noise = bool(scores) and not vouched
    if noise:
        console.print("[yellow]the control vouches for no score: they stay out of the granularity "
                      "decision and the labels say so (scores_noise)[/]")
    elif scores:
        console.print(f"[green]the control vouches for {', '.join(vouched)}: only those enter the granularity "
                      "decision[/]")
    for cp in cps:
        final_labels(cp, explanations, scores, vouched)
        undescribed = sum(not (r.key in explanations and explanations[r.key].description) for r in cp.records)
        console.print(f"{cp.labels_path}: {len(cp.classes)} labels, {len(cp.records) - undescribed} LLM-described"
                      + (f"; {undescribed} sampled latent(s) left without a description (the label's `error` "
                         "says why)" if undescribed else ""))
    shares = print_shares(cps, console)
    from autointerp.llm.prompts import prompt_sha256

    info: dict[str, Any] = {
        "features": features if features == "all" else int(features),
        "sample": {"n": sum(len(cp.sample) for cp in cps), "seed": seed,
                   "strata": {c: sum(cp.strata.get(c, 0) for cp in cps) for c in GRANULARITIES
                              if any(c in cp.strata for cp in cps)},
                   "per_checkpoint": {cp.name: {"n": len(cp.sample), "strata": cp.strata, "live": len(cp.classes)}
                                      for cp in cps}},
        "llm": {"model": llm_name, "engine": engine, "base_url": url},
        "prompt_sha256": {"explain": prompt_sha256("explain")},
        "concurrency": concurrency, "n_ctx": n_ctx, "contexts": contexts, "window": window, "no_score": no_score,
        "scores_noise": noise, "shares": shares,
        "checkpoints": [run_lib.saved_path(cp.target.records_path, run_dir) for cp in cps],
        "llm_stats": stats, "seconds": round(time.perf_counter() - started, 2)}
    if control is not None:
        info["control"] = control.to_dict()
        info["score_settings"] = score_settings.to_dict()
    elif needed is False:  # a rebuild keeps the control of the run that sent the requests
        previous = run_lib.read_manifest(run_dir).get("stages", {}).get("label", {})
        if "control" in previous:
            info["control"] = previous["control"]
    run_lib.update_manifest(run_dir, "label", info)
    console.print(f"done: {stats['requests']} requests, {stats['cache_hits']} cache hits, {stats['retries']} retries "
                  f"in {time.perf_counter() - started:.1f} s")


def _dry_run(cps: list[Checkpoint], settings, no_score: bool) -> None:
    from autointerp.interp.explainer import TEMPLATE, fit_prompt, load_finished
    from autointerp.llm.prompts import prompt_sha256

    first = next((r for cp in cps for r in cp.records), None)
    if first is not None:
        prompt = asyncio.run(fit_prompt(first, None, settings.prompt_budget, settings.n_contexts, settings.window)).text
        print(f"--- first prompt (feature {first.feature}, step {first.checkpoint_step}; sha256 "
              f"{prompt_sha256(TEMPLATE)[:12]}; trimmed by an estimate, the server's tokenizer decides) ---")
        print(prompt)
        print("---")
    pending = sum(len({r.key for r in cp.records} - load_finished(cp.target.folder / "explanations.jsonl").keys())
                  for cp in cps)
    total = sum(len(cp.records) for cp in cps)
    live = sum(len(cp.classes) for cp in cps)
    print(f"{live} live latents labelled statistically; an LLM sample of {total} in {len(cps)} SAE(s): "
          f"{pending} explain requests to send (+ up to one re-ask each; cached answers are not re-sent)"
          f"{'' if no_score else ', then the scorers and the control'}; nothing sent or written (--dry-run)")
