"""Simulator scores: how well a latent's description predicts where it fires.

Three scores per latent, each from one LLM call over held-out contexts (the explainer is meant to
see the even-ranked top contexts, the simulator gets the odd-ranked ones: `split_contexts`):
- simulation (OpenAI automated-interpretability, "all at once"): the simulator predicts each
  token's level 0-10 from the description; the score is the Pearson correlation of predicted vs
  true levels over all tokens of activating and non-activating windows. Where the server returns
  top_logprobs, a prediction is the expected value over the digit tokens; otherwise the parsed
  JSON integer.
- detection (delphi): activating and non-activating windows, shuffled; the simulator says which
  fire; balanced accuracy.
- fuzzing (delphi): activating windows with the truly active tokens marked, or as many random
  inactive tokens marked; the simulator says which markings are right; balanced accuracy.
Metric functions are pure; the LLM calls go through llm.LLMClient (cache, retries, concurrency).
Scores stream to step-N/scores.jsonl, one line per latent, so a stopped run resumes.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autointerp import run as run_lib
from autointerp.errors import UserError
from autointerp.language import clean_token
from autointerp.llm import stream_results
from autointerp.schema import Context, Explanation, FeatureRecord, Scores, iter_jsonl, read_finished, read_records

METHODS = ("simulation", "detection", "fuzzing")
TEMPLATES = {"simulation": "simulate", "detection": "detect", "fuzzing": "fuzz"}


# ---- pure metrics --------------------------------------------------------------------------------

def correlation(predicted: Sequence[float], true: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (no information either way)."""
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if p.size != t.size:
        raise ValueError(f"{p.size} predictions for {t.size} true values")
    if p.size < 2 or p.std() == 0 or t.std() == 0:
        return 0.0
    return float(np.corrcoef(p, t)[0, 1])


def balanced_accuracy(true: Sequence[bool], predicted: Sequence[bool]) -> float:
    """Mean of the recall on positives and on negatives (0.5 for any constant guesser)."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(predicted)} answers for {len(true)} items")
    if len(set(true)) < 2:  # one class only: plain accuracy is all there is
        return float(np.mean(np.asarray(true) == np.asarray(predicted))) if true else 0.0
    from sklearn.metrics import balanced_accuracy_score  # here: sklearn costs ~1 s of every CLI start

    return float(balanced_accuracy_score(list(true), list(predicted)))


def expected_level(top_logprobs: dict[str, float]) -> float | None:
    """Expected level over the alternatives that are integers 0..10 (renormalised); None if none are."""
    weights = {}
    for token, logprob in top_logprobs.items():
        text = token.strip()
        if text.isdigit() and 0 <= int(text) <= 10:
            weights[int(text)] = weights.get(int(text), 0.0) + math.exp(logprob)
    total = sum(weights.values())
    return sum(k * w for k, w in weights.items()) / total if total > 0 else None


# ---- held-out material ---------------------------------------------------------------------------

def split_contexts(record: FeatureRecord) -> tuple[list[Context], list[Context]]:
    """(explainer's contexts, simulator's held-out contexts): even-ranked vs odd-ranked."""
    return record.contexts[0::2], record.contexts[1::2]


def window(context: Context, width: int) -> Context:
    """The tokens within `width` of the context's max-activating token (its start if none fires)."""
    center = context.max_index
    if center < 0 or max(context.levels, default=0) <= 0:
        center = min(width, max(len(context.tokens) - 1, 0))
    lo, hi = max(0, center - width), min(len(context.tokens), center + width + 1)
    return Context(tokens=context.tokens[lo:hi], levels=context.levels[lo:hi])


def _fires(context: Context) -> bool:
    return any(v > 0 for v in context.levels)


def negative_pool(record: FeatureRecord, others: Sequence[FeatureRecord], n: int, width: int) -> tuple[list[Context], str]:
    """Non-activating windows: the record's own negatives where the latent is silent (records'
    "random" kind; the weakly firing "similar" ones are no negatives), else other latents' top
    windows with levels set to 0 (an approximation: this latent is assumed silent there)."""
    own = [window(c, width) for c in record.negatives if c.tokens and not _fires(c)]
    if own:
        return own[:n], "record"
    pool = [o for o in others if o.key != record.key and o.contexts]
    if not pool:
        return [], "none"
    rng = random.Random(f"negatives:{record.checkpoint_step}:{record.feature}")
    chosen = rng.sample(pool, min(n, len(pool)))
    out = []
    for o in chosen:
        w = window(o.contexts[0], width)
        out.append(Context(w.tokens, [0] * len(w.tokens)))
    return out, "other-latents"


def _text(context: Context, marked: set[int] | None = None) -> str:
    parts = []
    for i, token in enumerate(context.tokens):
        t = clean_token(token)
        parts.append(f"<<{t}>>" if marked and i in marked else t)
    return json.dumps("".join(parts), ensure_ascii=False)


# ---- the LLM calls -------------------------------------------------------------------------------

@dataclass
class ScoreSettings:
    """How many windows each call shows, and how wide they are (prompt size = CPU time)."""

    sim_contexts: int = 2  # held-out activating windows in the simulation call
    sim_negatives: int = 1  # non-activating windows in the simulation call
    det_contexts: int = 2  # activating windows in the detection call (+ as many non-activating)
    fuzz_contexts: int = 4  # windows in the fuzzing call (half marked right, half wrong)
    window: int = 4  # tokens either side of the max-activating token
    top_logprobs: int = 5
    methods: tuple[str, ...] = METHODS
    max_tokens: int = 400


@dataclass
class _Call:
    value: float | None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _prompt(name: str, **variables: Any) -> tuple[str, str]:
    from autointerp.explain import prompt_sha256, render  # the label stage owns the prompt loader
    return render(name, **variables), prompt_sha256(name)


def _array_schema(key: str, n: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: {"type": "array", "items": item, "minItems": n, "maxItems": n}},
            "required": [key], "additionalProperties": False}


def simulation_predictions(text: str, logprobs: list | None, n: int) -> tuple[list[float], str]:
    """Per-token predictions from an answer {"activations": [...]}: logprob expected values where
    the generated number is one token with digit alternatives, the parsed integer otherwise."""
    from autointerp.llm import parse_json_answer
    values = parse_json_answer(text).get("activations", [])
    parsed = [float(min(max(int(v), 0), 10)) if isinstance(v, (int, float)) else 0.0 for v in values][:n]
    parsed += [0.0] * (n - len(parsed))
    if not logprobs or "".join(lp.token for lp in logprobs) != text:
        return parsed, "json"
    starts, pos = {}, 0
    for lp in logprobs:
        starts[pos] = lp
        pos += len(lp.token)
    array = re.search(r'"activations"\s*:\s*\[([^\]]*)\]', text)
    if not array:
        return parsed, "json"
    out, used = [], 0
    for i, m in enumerate(re.finditer(r"\d+(?:\.\d+)?", array.group(1))):
        if i >= n:
            break
        lp = starts.get(array.start(1) + m.start())
        ev = expected_level(lp.top) if lp is not None and lp.token.strip() == m.group(0) and lp.top else None
        used += ev is not None
        out.append(ev if ev is not None else parsed[i])
    out += parsed[len(out):]
    return out, "logprobs" if used else "json"


async def _chat_json_logprobs(client, messages, schema, sha: str, max_tokens: int, top_logprobs: int):
    """A JSON-schema answer with logprobs."""
    from autointerp.llm import json_response_format

    return await client.chat(messages, template_sha=sha, response_format=json_response_format(schema, "simulation"),
                             max_tokens=max_tokens, temperature=0.0, logprobs=True, top_logprobs=top_logprobs)


async def simulate(client, description: str, held_out: list[Context], negatives: list[Context],
                   s: ScoreSettings) -> _Call:
    windows = [window(c, s.window) for c in held_out[:s.sim_contexts]] + negatives[:s.sim_negatives]
    windows = [w for w in windows if w.tokens]
    texts, true, index = [], [], 0
    for w in windows:
        tokens = []
        for token, level in zip(w.tokens, w.levels):
            index += 1
            tokens.append({"index": index, "text": json.dumps(clean_token(token), ensure_ascii=False)})
            true.append(level)
        texts.append(tokens)
    if index == 0 or len(set(true)) < 2:
        return _Call(None, error="no held-out tokens with varying activation")
    prompt, sha = _prompt("simulate", description=description, texts=texts, n_tokens=index)
    messages = [{"role": "user", "content": prompt}]
    schema = _array_schema("activations", index, {"type": "integer", "minimum": 0, "maximum": 10})
    result = await _chat_json_logprobs(client, messages, schema, sha, max(s.max_tokens, 4 * index + 32),
                                       s.top_logprobs)
    if result.truncated:  # a cut-short array would be padded with zeros: not a prediction
        return _Call(None, error="simulation answer cut short by max_tokens")
    try:
        predicted, method = simulation_predictions(result.text, result.logprobs, index)
    except (ValueError, AttributeError, TypeError) as exc:
        return _Call(None, error=f"simulation answer unreadable: {exc}")
    return _Call(correlation(predicted, true), {"method": method, "n_tokens": index, "n_windows": len(windows)})


async def _ask_booleans(client, template: str, key: str, description: str, texts: list[str]) -> list[bool]:
    prompt, sha = _prompt(template, description=description, texts=texts)
    answer = await client.chat_json([{"role": "user", "content": prompt}],
                                    _array_schema(key, len(texts), {"type": "boolean"}), template_sha=sha,
                                    max_tokens=16 + 8 * len(texts), name=key)
    values = [bool(v) for v in answer.get(key, [])][:len(texts)]
    return values + [False] * (len(texts) - len(values))


async def detect(client, description: str, held_out: list[Context], negatives: list[Context], s: ScoreSettings,
                 rng: random.Random) -> _Call:
    positives = [window(c, s.window) for c in held_out if _fires(c)][:s.det_contexts]
    negs = negatives[:max(len(positives), 1)]
    items = [(w, True) for w in positives] + [(w, False) for w in negs]
    if not positives or not negs:
        return _Call(None, error="detection needs activating and non-activating windows")
    rng.shuffle(items)
    answers = await _ask_booleans(client, "detect", "fires", description, [_text(w) for w, _ in items])
    return _Call(balanced_accuracy([t for _, t in items], answers), {"n": len(items)})


async def fuzz(client, description: str, held_out: list[Context], s: ScoreSettings, rng: random.Random) -> _Call:
    items = []
    for i, c in enumerate([window(c, s.window) for c in held_out if _fires(c)][:s.fuzz_contexts]):
        top = max(c.levels)
        right = {j for j, v in enumerate(c.levels) if v >= max(1, top // 2)}
        idle = [j for j, v in enumerate(c.levels) if v == 0]
        if i % 2 == 0 or len(idle) < len(right):
            items.append((c, right, True))
        else:
            items.append((c, set(rng.sample(idle, len(right))), False))
    if len({t for _, _, t in items}) < 2:
        return _Call(None, error="fuzzing needs at least two activating windows")
    rng.shuffle(items)
    answers = await _ask_booleans(client, "fuzz", "correct", description, [_text(c, m) for c, m, _ in items])
    return _Call(balanced_accuracy([t for _, _, t in items], answers), {"n": len(items)})


async def score_feature(client, record: FeatureRecord, description: str, negatives: list[Context] | None = None,
                        settings: ScoreSettings | None = None, negatives_source: str = "record") -> Scores:
    """All requested scores of one latent. A method whose answer is unusable is None with its reason."""
    from autointerp.llm import LLMAnswerError

    s = settings or ScoreSettings()
    if negatives is None:
        negatives, negatives_source = negative_pool(record, [], max(s.sim_negatives, s.det_contexts), s.window)
    _, held_out = split_contexts(record)
    rng = random.Random(f"score:{record.checkpoint_step}:{record.feature}")
    calls: dict[str, Any] = {}
    if "simulation" in s.methods:
        calls["simulation"] = simulate(client, description, held_out, negatives, s)
    if "detection" in s.methods:
        calls["detection"] = detect(client, description, held_out, negatives, s, random.Random(rng.random()))
    if "fuzzing" in s.methods:
        calls["fuzzing"] = fuzz(client, description, held_out, s, random.Random(rng.random()))
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    out = Scores(checkpoint_step=record.checkpoint_step, feature=record.feature,
                 simulator={"model": getattr(client, "model", None), "negatives": negatives_source,
                            "held_out": len(held_out)})
    errors = []
    for name, result in zip(calls, results):
        if isinstance(result, LLMAnswerError):
            errors.append(f"{name}: {result}")
            continue
        if isinstance(result, BaseException):
            raise result  # server down etc.: stop; finished latents are saved
        setattr(out, name, None if result.value is None else round(result.value, 4))
        out.simulator[name] = result.info
        if result.error:
            errors.append(f"{name}: {result.error}")
    out.error = "; ".join(errors) or None
    return out


# ---- many latents, resumable ---------------------------------------------------------------------

def load_finished(path: Path) -> dict[tuple[int | None, int], Scores]:
    return read_finished(path, Scores.from_dict)


def score_records(records: Sequence[FeatureRecord], explanations: Sequence[Explanation], client,
                  out_path: str | Path | None = None, settings: ScoreSettings | None = None,
                  on_done: Callable[[Scores], None] | None = None) -> list[Scores]:
    """Scores for every record (in records' order), appended to out_path as each finishes.

    Latents already in out_path are not scored again; a latent without a description gets a
    Scores line with an error and no LLM call."""
    s = settings or ScoreSettings()
    by_key = {e.key: e for e in explanations}
    done = load_finished(Path(out_path)) if out_path else {}
    pending = [r for r in records if r.key not in done]

    async def one(record: FeatureRecord) -> Scores:
        expl = by_key.get(record.key)
        if expl is None or not (expl.description or "").strip():
            return Scores(record.checkpoint_step, record.feature, error="no description to score")
        negatives, source = negative_pool(record, records, max(s.sim_negatives, s.det_contexts), s.window)
        return await score_feature(client, record, expl.description, negatives, s, source)

    if pending:
        run = getattr(client, "run", asyncio.run)  # LLMClient.run also closes its connections in that loop
        run(stream_results([one(r) for r in pending], done, out_path, on_done))
    return [done[r.key] for r in records]


# ---- the `score` command -------------------------------------------------------------------------

def cli(
    target: Path = typer.Argument(..., help="A records.jsonl file, or a run directory (every step-N/records.jsonl); "
                                            "explanations.jsonl is read from beside each records file."),
    base_url: str = typer.Option(None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1; "
                                            "without it the embedded llama.cpp server is started and stopped."),
    model: str = typer.Option(None, help="Model name at --base-url (default: the first the server lists)."),
    engine: str = typer.Option(None, help="Embedded server engine (llama-cpp or vllm)."),
    threads: int = typer.Option(None, help="CPU threads of the embedded llama.cpp server."),
    n_ctx: int = typer.Option(2048, "--n-ctx", help="The embedded server's context window in tokens."),
    concurrency: int = typer.Option(4, help="Requests in flight at once."),
    features: int = typer.Option(None, help="Only N features of each checkpoint: the same seeded sample of live "
                                            "ones as `autointerp label --features N`."),
    methods: str = typer.Option(",".join(METHODS), help="Comma-separated: simulation,detection,fuzzing."),
    sim_contexts: int = typer.Option(2, help="Held-out activating windows in the simulation call."),
    sim_negatives: int = typer.Option(1, help="Non-activating windows in the simulation call."),
    det_contexts: int = typer.Option(2, help="Activating windows in the detection call (+ as many non-activating)."),
    fuzz_contexts: int = typer.Option(4, help="Windows in the fuzzing call (half marked right, half wrong)."),
    window_width: int = typer.Option(4, "--window", help="Tokens shown either side of the max-activating token."),
    relabel: bool = typer.Option(True, help="Rebuild labels.jsonl from records, explanations and the new scores."),
    stats_only: bool = typer.Option(False, "--stats-only", help="No server: skip scoring and write labels.jsonl "
                                                                "from the statistical model alone."),
    timeout: float = typer.Option(120.0, help="Seconds per request before it is retried."),
    retries: int = typer.Option(4, help="Retries per request on timeouts, 429, 5xx, connection errors."),
) -> None:
    """Score descriptions with the simulator: writes step-N/scores.jsonl (and labels.jsonl)."""
    from autointerp import granularity
    from autointerp.explain import resolve_targets, sample_live
    from autointerp.serve import endpoint
    from autointerp.schema import write_jsonl

    console = Console(stderr=True)
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    if bad := [m for m in chosen if m not in METHODS]:
        raise UserError(f"unknown scoring method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    settings = ScoreSettings(sim_contexts, sim_negatives, det_contexts, fuzz_contexts, window_width, methods=chosen)
    if stats_only and not features:  # every latent, streamed (a whole SAE does not fit in memory as objects)
        from autointerp.statlabels import write_stat_labels

        for t in resolve_targets(target):
            started = time.perf_counter()
            n = write_stat_labels(t.records_path, t.folder / "labels.jsonl")
            seconds = time.perf_counter() - started
            console.print(f"{t.folder / 'labels.jsonl'}: {n} statistical labels "
                          f"({n / max(seconds, 1e-9):,.1f} features/s)")
        return
    work = []
    for t in resolve_targets(target):
        records = read_records(t.records_path)
        records = sample_live(records, features) if features else records  # the same sample as `label`
        expl_path = t.folder / "explanations.jsonl"
        explanations = list(iter_jsonl(expl_path, Explanation.from_dict)) if expl_path.exists() else None
        if explanations is None and not stats_only:
            raise UserError(f"{expl_path}: no explanations to score (run `autointerp label` first, "
                            "or pass --stats-only for statistical labels)")
        work.append((t, records, explanations))
    started = time.perf_counter()
    if stats_only:
        for t, records, explanations in work:
            labels = granularity.build_labels(records, explanations, None)
            write_jsonl(t.folder / "labels.jsonl", labels)
            console.print(f"{t.folder / 'labels.jsonl'}: {len(labels)} statistical labels")
        return
    run_dir = work[0][0].run_dir
    with endpoint(base_url, model, engine, threads, n_ctx) as (url, model_name, engine_name, check_alive):
        from autointerp.llm import LLMClient
        client = LLMClient(url, model_name, cache_path=run_dir / "cache.sqlite", concurrency=concurrency,
                           timeout=timeout, max_retries=retries, check_alive=check_alive)
        try:
            for t, records, explanations in work:
                with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console) as progress:
                    task = progress.add_task(f"score {t.folder.name}", total=len(records),
                                             completed=len(load_finished(t.folder / "scores.jsonl").keys()
                                                           & {r.key for r in records}))
                    scores = score_records(records, explanations, client, t.folder / "scores.jsonl", settings,
                                           on_done=lambda _: progress.update(task, advance=1))
                if relabel:
                    write_jsonl(t.folder / "labels.jsonl", granularity.build_labels(records, explanations, scores))
                ok = [x for x in scores if x.simulation is not None]
                mean = sum(x.simulation for x in ok) / len(ok) if ok else float("nan")
                console.print(f"{t.folder / 'scores.jsonl'}: {len(scores)} latents, mean simulation {mean:.3f}")
        finally:
            stats = client.stats.to_dict()
            client.close()
            run_lib.update_manifest(run_dir, "score", {
                "model": model_name, "engine": engine_name, "base_url": url, "methods": list(chosen),
                "settings": settings.__dict__ | {"methods": list(chosen)},
                "prompt_sha256": {n: _prompt_sha(n) for n in TEMPLATES.values()},
                "llm_stats": stats, "seconds": round(time.perf_counter() - started, 2)})
    console.print(f"done: {stats['requests']} requests, {stats['cache_hits']} cache hits in "
                  f"{time.perf_counter() - started:.1f} s")


def _prompt_sha(name: str) -> str:
    from autointerp.explain import prompt_sha256
    return prompt_sha256(name)
