"""The explainer: one LLM request per latent -> description, granularity vote, cross-lingual flag.

`autointerp label RECORDS|RUN_DIR` = explain -> score -> build labels -> labels.jsonl, per
checkpoint. Explanations stream to step-N/explanations.jsonl one line per latent, so a stopped
run resumes with the latents it has not done yet; answers are cached in RUN/cache.sqlite, so a
rerun sends no request twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autointerp import granularity, score
from autointerp import run as run_lib
from autointerp.errors import UserError
from autointerp.llm import LLMAnswerError, LLMClient, estimate_tokens, stream_results
from autointerp.prompting import PROMPTS_DIR, prompt_sha256, render  # noqa: F401 (score.py imports them from here until it switches)
from autointerp.schema import (GRANULARITIES, Explanation, FeatureRecord, Scores, read_finished, read_records,
                               write_jsonl)
from autointerp.serve import endpoint

TEMPLATE = "explain"

EXPLANATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "description": {"type": "string"},
        "granularity": {"type": "string", "enum": list(GRANULARITIES)},
        "cross_lingual": {"type": "boolean"},
        "confidence": {"type": "number"},
    },
    "required": ["description", "granularity", "cross_lingual", "confidence"],
    "additionalProperties": False,
}

# Tried in order until the prompt fits the context window: (contexts, tokens either side of the max).
TRIM_STEPS = ((12, 8), (10, 6), (8, 5), (5, 4), (3, 3), (1, 2))
CHAT_OVERHEAD_TOKENS = 48  # the chat template's role markers around the prompt


# ---- prompts -------------------------------------------------------------------------------------

def quote_token(token: str) -> str:
    """A token as a JSON string: HTML, quotes and instruction-like text stay visibly data."""
    return json.dumps(token, ensure_ascii=False)


def snippet(context, window: int) -> str:
    """Tokens around the max-activating one: <<max:level>>, other active tokens token:level."""
    center = context.max_index
    if center < 0:
        return ""
    lo, hi = max(0, center - window), min(len(context.tokens), center + window + 1)
    parts = []
    for i in range(lo, hi):
        token, level = quote_token(context.tokens[i]), context.levels[i]
        if i == center:
            parts.append(f"<<{token}:{level}>>")
        elif level > 0:
            parts.append(f"{token}:{level}")
        else:
            parts.append(token)
    return " ".join(parts)


def top_tokens(record: FeatureRecord, n: int = 8) -> str:
    counts = Counter(c.tokens[c.max_index] for c in explainer_contexts(record) if c.max_index >= 0)
    return ", ".join(f"{quote_token(t)} x{k}" for t, k in counts.most_common(n))


def explainer_contexts(record: FeatureRecord) -> list:
    """The contexts the explainer may see; the simulator scores on the others (held out)."""
    return score.split_contexts(record)[0]


def sample_live(records: list[FeatureRecord], n: int, seed: int = 0) -> list[FeatureRecord]:
    """A seeded random sample of n latents that have contexts, in feature order (stable across reruns)."""
    live = [r for r in records if r.contexts]
    chosen = random.Random(seed).sample(live, min(n, len(live)))
    return sorted(chosen, key=lambda r: r.feature)


def render_explain_prompt(record: FeatureRecord, max_contexts: int = 10, window: int = 6) -> str:
    return render(TEMPLATE, top_tokens=top_tokens(record),
                  snippets=[snippet(c, window) for c in explainer_contexts(record)[:max_contexts]])


def trim_steps(max_contexts: int, window: int) -> list[tuple[int, int]]:
    smaller = [(min(n, max_contexts), min(w, window)) for n, w in TRIM_STEPS]
    return list(dict.fromkeys([(max_contexts, window), *smaller]))


async def fit_prompt(record: FeatureRecord, client: LLMClient | None, budget: int, max_contexts: int = 10,
                     window: int = 6) -> str:
    """The richest rendering (most contexts, widest window) whose token count, by the server's
    tokenizer where it has one, fits `budget`; the smallest one when none does."""
    prompt = ""
    for n_contexts, window in trim_steps(max_contexts, window):
        prompt = render_explain_prompt(record, n_contexts, window)
        if len(prompt.encode("utf-8")) <= budget:  # a byte-level BPE never has more tokens than bytes
            return prompt
        tokens = await client.count_tokens(prompt) if client is not None else estimate_tokens(prompt)
        if tokens <= budget:
            return prompt
    return prompt


# ---- explaining ----------------------------------------------------------------------------------

@dataclass
class ExplainSettings:
    max_contexts: int = 10
    window: int = 6
    context_window: int = 2048  # the server's n_ctx
    max_tokens: int = 160  # the answer's budget
    engine: str = ""

    @property
    def prompt_budget(self) -> int:
        return self.context_window - self.max_tokens - CHAT_OVERHEAD_TOKENS


def _failed(record: FeatureRecord, explainer: dict[str, Any], error: str) -> Explanation:
    return Explanation(checkpoint_step=record.checkpoint_step, feature=record.feature, description="",
                       granularity=None, cross_lingual=False, confidence=0.0, explainer=explainer, error=error)


async def explain_feature(record: FeatureRecord, client: LLMClient, settings: ExplainSettings) -> Explanation:
    sha = prompt_sha256(TEMPLATE)
    explainer = {"model": client.model, "prompt_sha256": sha, "engine": settings.engine}
    if not any(c.max_index >= 0 and c.levels[c.max_index] > 0 for c in record.contexts):
        return _failed(record, explainer, "no active contexts (dead latent)")
    prompt = await fit_prompt(record, client, settings.prompt_budget, settings.max_contexts, settings.window)
    try:
        answer = await client.chat_json([{"role": "user", "content": prompt}], EXPLANATION_SCHEMA,
                                        template_sha=sha, max_tokens=settings.max_tokens, name="explanation")
    except LLMAnswerError as exc:
        return _failed(record, explainer, str(exc))
    return Explanation(checkpoint_step=record.checkpoint_step, feature=record.feature,
                       description=answer["description"].strip(), granularity=answer["granularity"],
                       cross_lingual=bool(answer["cross_lingual"]),
                       confidence=min(1.0, max(0.0, float(answer["confidence"]))), explainer=explainer)


def load_finished(path: Path) -> dict[tuple[int | None, int], Explanation]:
    return read_finished(path, Explanation.from_dict)


async def explain_records_async(records: list[FeatureRecord], client: LLMClient, out_path: Path | None = None,
                                settings: ExplainSettings | None = None,
                                on_done: Callable[[Explanation], None] | None = None) -> list[Explanation]:
    settings = settings or ExplainSettings()
    done = load_finished(out_path) if out_path else {}
    todo = [r for r in records if r.key not in done]
    await stream_results([explain_feature(r, client, settings) for r in todo], done, out_path, on_done)
    return [done[r.key] for r in records]


def explain_records(records: list[FeatureRecord], client: LLMClient, out_path: str | Path | None = None, *,
                    max_contexts: int = 10, window: int = 6, context_window: int = 2048, max_tokens: int = 160,
                    engine: str = "", on_done: Callable[[Explanation], None] | None = None) -> list[Explanation]:
    """Explain every record (skipping those already in out_path), streaming each answer to out_path.
    An answer invalid after the repair re-ask gives granularity=None with `error`; the batch goes on."""
    settings = ExplainSettings(max_contexts, window, context_window, max_tokens, engine)
    return client.run(explain_records_async(records, client, Path(out_path) if out_path else None, settings,
                                            on_done))


# ---- labels --------------------------------------------------------------------------------------

def run_scoring(records: list[FeatureRecord], explanations: list[Explanation], client: LLMClient,
                out_path: Path, console: Console) -> list[Scores]:
    """score.score_records with a progress bar."""
    with _progress(console) as progress:
        task = progress.add_task(f"score {out_path.parent.name}", total=len(records), rates="")
        scores = score.score_records(records, explanations, client, out_path,
                                     on_done=lambda _: progress.update(task, advance=1))
        progress.update(task, completed=len(records))
    return scores


# ---- the `label` command -------------------------------------------------------------------------

@dataclass
class Target:
    records_path: Path
    folder: Path  # where explanations/scores/labels.jsonl go: next to records.jsonl
    run_dir: Path  # where manifest.json and cache.sqlite live


def resolve_targets(target: Path) -> list[Target]:
    if target.is_file():
        folder = target.parent
        run_dir = folder.parent if run_lib._STEP_DIR.match(folder.name) else folder
        return [Target(target, folder, run_dir)]
    if target.is_dir():
        if run_lib.records_file(target).is_file():
            return resolve_targets(run_lib.records_file(target))
        found = [run_lib.records_file(run_lib.step_dir(target, s)) for s in run_lib.checkpoint_steps(target)]
        found = [p for p in found if p.is_file()]
        if found:
            return [Target(p, p.parent, target) for p in found]
        raise UserError(f"{target}: no step-N/records.jsonl inside (run `autointerp collect` first)")
    raise UserError(f"{target}: no such records file or run directory")


def _work_left(work: list[tuple[Target, list[FeatureRecord]]], no_score: bool) -> bool:
    """Whether any latent still needs an explanation (or a score): if not, no server is needed."""
    for t, records in work:
        keys = {r.key for r in records}
        if not keys <= load_finished(t.folder / "explanations.jsonl").keys():
            return True
        if not no_score and not keys <= score.load_finished(t.folder / "scores.jsonl").keys():
            return True
    return False


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), console=console)


def cli(
    target: Path = typer.Argument(..., help="A records.jsonl file, or a run directory (every step-N/records.jsonl)."),
    base_url: str = typer.Option(None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1; "
                                            "without it the embedded llama.cpp server is started and stopped."),
    model: str = typer.Option(None, help="Model name at --base-url (default: the first the server lists); "
                                         "a GGUF path for the embedded server."),
    engine: str = typer.Option(None, help="Embedded server engine (llama-cpp or vllm), or the name to record "
                                          "for --base-url."),
    concurrency: int = typer.Option(4, help="Requests in flight at once."),
    features: int = typer.Option(None, help="Only N features of each checkpoint: a seeded random sample of the "
                                            "live ones (with contexts), as the paper sampled 100 per checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the first rendered prompt and the request "
                                                          "count; send nothing."),
    no_score: bool = typer.Option(False, "--no-score", help="Skip the simulator scores."),
    threads: int = typer.Option(None, help="CPU threads of the embedded llama.cpp server."),
    n_ctx: int = typer.Option(2048, "--n-ctx", help="The server's context window in tokens; prompts are "
                                                   "trimmed to fit."),
    max_contexts: int = typer.Option(10, help="Contexts shown per feature (fewer when they do not fit)."),
    window: int = typer.Option(6, help="Tokens shown either side of the max-activating token."),
    timeout: float = typer.Option(300.0, help="Seconds per request (queueing at the server included) before "
                                               "it is retried."),
    retries: int = typer.Option(4, help="Retries per request on timeouts, 429, 5xx, connection errors."),
) -> None:
    """Explain, score and label every feature: writes explanations.jsonl, scores.jsonl, labels.jsonl."""
    console = Console(stderr=True)
    targets = resolve_targets(target)
    work = []
    for t in targets:
        records = read_records(t.records_path)
        if features:
            records = sample_live(records, features)
        work.append((t, records))
    total = sum(len(r) for _, r in work)
    if dry_run:
        _dry_run(work, total, n_ctx, max_contexts, window)
        return
    run_dir = targets[0].run_dir
    sha = prompt_sha256(TEMPLATE)
    started = time.perf_counter()
    needed = _work_left(work, no_score)
    with endpoint(base_url, model, engine, threads, n_ctx, needed) as (url, model_name, engine_name, check_alive):
        client = LLMClient(url, model_name, cache_path=run_dir / "cache.sqlite", concurrency=concurrency,
                           timeout=timeout, max_retries=retries, check_alive=check_alive)
        if needed:
            console.print(f"labelling {total} features in {len(work)} checkpoint(s) with {model_name} at {url}")
        else:
            console.print(f"all {total} features already explained{'' if no_score else ' and scored'}: "
                          "no server needed, rebuilding labels")
        try:
            for t, records in work:
                _label_checkpoint(t, records, client, console, engine_name, n_ctx, max_contexts, window, no_score)
        finally:
            stats = client.stats.to_dict()
            client.close()
            if needed:  # a run that sent nothing keeps the manifest of the run that did
                run_lib.update_manifest(run_dir, "label", {
                    "model": model_name, "engine": engine_name, "base_url": url, "prompt_sha256": {TEMPLATE: sha},
                    "concurrency": concurrency, "features": features, "n_ctx": n_ctx,
                    "max_contexts": max_contexts, "window": window,
                    "checkpoints": [str(t.records_path) for t, _ in work], "llm_stats": stats,
                    "seconds": round(time.perf_counter() - started, 2)})
    console.print(f"done: {stats['requests']} requests, {stats['cache_hits']} cache hits, "
                  f"{stats['retries']} retries, {stats['repairs']} repairs in "
                  f"{time.perf_counter() - started:.1f} s")


def _label_checkpoint(t: Target, records: list[FeatureRecord], client: LLMClient, console: Console,
                      engine: str, n_ctx: int, max_contexts: int, window: int, no_score: bool) -> None:
    start, base = time.perf_counter(), client.stats.to_dict()

    finished = 0

    def rates() -> str:
        s, dt = client.stats, max(time.perf_counter() - start, 1e-9)
        tokens = s.prompt_tokens + s.completion_tokens - base["prompt_tokens"] - base["completion_tokens"]
        return f"{finished / dt:.2f} features/s  {tokens / dt:,.0f} tok/s  cache hits {s.cache_hits - base['cache_hits']}"

    with _progress(console) as progress:
        task = progress.add_task(f"explain {t.records_path.parent.name}", total=len(records), rates="")
        done_before = len(load_finished(t.folder / "explanations.jsonl").keys() & {r.key for r in records})
        progress.update(task, completed=done_before)

        def on_done(_: Explanation) -> None:
            nonlocal finished
            finished += 1
            progress.update(task, advance=1, rates=rates())

        explanations = explain_records(records, client, t.folder / "explanations.jsonl", max_contexts=max_contexts,
                                       window=window, context_window=n_ctx, engine=engine, on_done=on_done)
    failed = sum(e.granularity is None for e in explanations)
    scores = None if no_score else run_scoring(records, explanations, client, t.folder / "scores.jsonl", console)
    labels = granularity.build_labels(records, explanations, scores)
    write_jsonl(t.folder / "labels.jsonl", labels)
    dt = time.perf_counter() - start
    console.print(f"{t.folder / 'labels.jsonl'}: {len(labels)} labels ({failed} without a valid answer), "
                  f"{len(records) / dt:.2f} features/s")


def _dry_run(work: list[tuple[Target, list[FeatureRecord]]], total: int, n_ctx: int, max_contexts: int,
             window: int) -> None:
    pending = sum(len({r.key for r in recs} - load_finished(t.folder / "explanations.jsonl").keys())
                  for t, recs in work)
    first = next((r for _, recs in work for r in recs), None)
    if first is not None:
        budget = ExplainSettings(max_contexts, window, n_ctx).prompt_budget
        prompt = asyncio.run(fit_prompt(first, None, budget, max_contexts, window))
        print(f"--- first prompt (feature {first.feature}, step {first.checkpoint_step}; sha256 "
              f"{prompt_sha256(TEMPLATE)[:12]}; trimmed by an estimate, the server's tokenizer decides) ---")
        print(prompt)
        print("---")
    print(f"{total} features in {len(work)} checkpoint(s); {pending} explain requests to send "
          f"(+ up to one repair re-ask each; cached answers are not re-sent); nothing sent (--dry-run)")
