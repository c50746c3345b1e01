"""`autointerp score`: score the descriptions in a run's explanations.jsonl (the scorers and the
shuffled-description control), or label every latent statistically with --stats-only."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from autointerp import run as run_lib
from autointerp.errors import UserError
from autointerp.interp.control import control_plan, print_control, run_control
from autointerp.interp.score import pending_keys, read_descriptions, score_records, summary_line
from autointerp.interp.scorers import SCORERS
from autointerp.interp.scorers.settings import METHODS, ScoreSettings
from autointerp.labels import sampling
from autointerp.llm.prompts import prompt_sha256
from autointerp import options as O
from autointerp.progress import progress_bar


HELP_COUNTS = ("Defaults by engine: vllm 50 activating + 50 non-activating (delphi's), simulation from "
               "prompt logprobs; llama-cpp / other 10 + 10 (the most that keeps `make demo` within its time), "
               "simulation from a JSON answer.")


def cli(
    target: Path = typer.Argument(..., help="A records.jsonl file, or a run directory (every step-N/records.jsonl); "
                                            "explanations.jsonl is read from beside each records file."),
    server: str = O.server_option(),
    llm: str = O.llm_option(),
    engine: str = O.engine_option(),
    threads: int = O.llm_threads_option(),
    n_ctx: int = O.n_ctx_option(),
    vllm_python: str = O.vllm_python_option(),
    concurrency: int = O.concurrency_option(),
    features: str = O.features_option("to score"),
    methods: str = typer.Option(",".join(METHODS), help="Comma-separated: simulation,detection,fuzzing."),
    n_activating: int = typer.Option(None, help="Activating examples per method, drawn across activation "
                                                "quantiles of the held-out contexts. " + HELP_COUNTS),
    n_non_activating: int = typer.Option(None, help="Non-activating examples per method (the records' negatives)."),
    per_prompt: int = typer.Option(None, help="Detection/fuzzing examples per prompt (default 5, as delphi)."),
    window_width: int = typer.Option(None, "--window", help="Detection/fuzzing: tokens shown either side of the "
                                                            "max token (default 3 on CPU, 16 on vLLM)."),
    sim_window: int = typer.Option(None, help="Simulation: tokens shown either side of the max token (default 1 "
                                              "on CPU, 8 on vLLM)."),
    simulation: str = typer.Option(None, help="How the simulator's predictions are read: prompt-logprobs (vLLM: "
                                              "one prefill pass over the all-at-once prompt), per-token (llama.cpp: "
                                              "that prompt cut after each token, prefix-cached), json (any server: "
                                              "a JSON list answer); default by engine."),
    control_fraction: float = typer.Option(0.2, help="Share of the scored latents scored again with another "
                                                     "latent's description (the control)."),
    control_min: int = typer.Option(10, help="The control scores at least this many latents (all if fewer)."),
    no_control: bool = typer.Option(False, "--no-control", help="Skip the shuffled-description control."),
    rescore: bool = typer.Option(False, help="Score again the latents already in scores.jsonl (cached answers "
                                             "are reused)."),
    seed: int = O.seed_option("the example draws, bootstrap intervals and the control"),
    stats_only: bool = typer.Option(False, "--stats-only", help="No server: write labels.jsonl for every latent "
                                                                "from the statistical model alone."),
    timeout: float = O.timeout_option(),
    retries: int = O.retries_option(),
) -> None:
    """Score descriptions with delphi's detection and fuzzing and OpenAI's all-at-once simulation,
    then the shuffled-description control: writes step-N/scores.jsonl, RUN/control.jsonl and the
    control's verdict into the manifest. `autointerp label RUN` then rebuilds labels from them
    (no requests)."""
    from autointerp.llm.client import LLMClient
    from autointerp.records.read import read_records
    from autointerp.llm.serve import endpoint

    console = Console(stderr=True)
    settings = ScoreSettings.for_engine(
        engine, methods=tuple(m.strip() for m in methods.split(",") if m.strip()), n_activating=n_activating,
        n_non_activating=n_non_activating, per_prompt=per_prompt, window=window_width, sim_window=sim_window, simulation=simulation,
        seed=seed)
    targets = run_lib.resolve_targets(target)
    count = sampling.parse_count(features)  # None: every latent
    if stats_only and count is None:  # every latent, streamed (a whole SAE does not fit in memory as objects)
        from autointerp.labels.statlabels import write_stat_labels

        for t in targets:
            started = time.perf_counter()
            counts = write_stat_labels(t.records_path, t.folder / "labels.jsonl")
            seconds = time.perf_counter() - started
            n = counts.labelled + counts.dead
            console.print(f"{t.folder / 'labels.jsonl'}: {counts.labelled} statistical labels of live latents, "
                          f"{counts.dead} dead latents counted apart ({n / max(seconds, 1e-9):,.1f} features/s)")
        return
    work = []
    for t in targets:
        records = read_records(t.records_path)
        if count is not None:  # the latents `label` described (its stratified sample), else the plain seeded sample
            labelled = set(sampling.labelled_sample(t.folder / "labels.jsonl"))
            records = [r for r in records if r.key in labelled] if labelled else sampling.sample_live(records, count)
        expl_path = t.folder / "explanations.jsonl"
        if not expl_path.exists():
            raise UserError(f"{expl_path}: no explanations to score (run `autointerp label` first)")
        if rescore and (t.folder / "scores.jsonl").exists():
            (t.folder / "scores.jsonl").unlink()
        work.append((t, records, read_descriptions(expl_path)))
    run_dir = targets[0].run_dir
    control_path = run_dir / "control.jsonl"
    if rescore and control_path.exists():
        control_path.unlink()
    started = time.perf_counter()
    from autointerp.llm.vllm import VLLMConfig

    vllm = VLLMConfig(python=vllm_python) if vllm_python else None
    with endpoint(server, llm, engine, threads, n_ctx, vllm=vllm) as (url, model_name, engine_name, check_alive):
        client = LLMClient(url, model_name, cache_path=run_dir / "cache.sqlite", concurrency=concurrency,
                           timeout=timeout, max_retries=retries, check_alive=check_alive, seed=seed)
        all_records, all_descriptions, all_scores, control = [], {}, [], None
        try:
            for t, records, descriptions in work:
                out = t.folder / "scores.jsonl"
                with progress_bar(console=console) as progress:
                    task = progress.add_task(f"score {t.folder.name}", total=len(records),
                                             completed=len(records) - len(pending_keys(records, descriptions, out)))
                    scores = score_records(records, descriptions, client, out, settings,
                                           on_done=lambda _: progress.update(task, advance=1))
                console.print(summary_line(out, scores))
                all_records += records
                all_descriptions |= descriptions
                all_scores += scores
            if not no_control:
                planned, _, _ = control_plan(all_records, all_descriptions, all_scores, control_fraction,
                                             control_min, seed)
                with progress_bar(console=console) as progress:
                    task = progress.add_task("control (shuffled descriptions)", total=len(planned))
                    control = run_control(all_records, all_descriptions, all_scores, client, control_path, settings,
                                          control_fraction, control_min, seed,
                                          on_done=lambda _: progress.update(task, advance=1))
                print_control(control, console)
        finally:
            stats = client.stats.to_dict()
            client.close()
            info = {"model": model_name, "engine": engine_name, "base_url": url, "settings": settings.to_dict(),
                    "prompt_sha256": {n: prompt_sha256(n) for s in SCORERS.values() for n in s.templates},
                    "llm_stats": stats, "seconds": round(time.perf_counter() - started, 2)}
            if control is not None:
                info["control"] = control.to_dict()
                info["control_file"] = str(control_path)
            run_lib.update_manifest(run_dir, "score", info)
    console.print(f"done: {stats['requests']} requests, {stats['cache_hits']} cache hits in "
                  f"{time.perf_counter() - started:.1f} s; `autointerp label {target}` rebuilds the labels")


