"""The scoring stage: every requested scorer (`autointerp.interp.scorers`) over many latents,
resumable; the `autointerp score` command is `autointerp.interp.cli`, the shuffled-description
control `autointerp.interp.control`.

Requests go method by method over chunks of latents, so a one-slot llama.cpp server keeps each
prompt's few-shot prefix in its cache. Scores stream to step-N/scores.jsonl (the control's to
their own file), one line per latent, so a stopped run resumes; a line holds each method's score,
its seeded bootstrap 95% interval (`Scores.ci95`), the AUC where the method has one, and what the
simulator was shown.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from autointerp.interp.scorers import SCORERS
from autointerp.interp.scorers.base import MethodResult
from autointerp.interp.scorers.examples import plan_examples
from autointerp.interp.scorers.settings import METHODS, ScoreSettings
from autointerp.llm.client import LLMAnswerError, RequestRejected, ResultSink
from autointerp.jsonl import read_finished
from autointerp.schema import FeatureRecord, Key, Scores, row_key

NO_DESCRIPTION = "no description to score"


def description_sha(description: str) -> str:
    return hashlib.sha256(description.encode("utf-8")).hexdigest()[:16]


def load_finished(path: str | Path) -> dict[Key, Scores]:
    return read_finished(path, Scores.from_dict)


def is_current(scores: Scores | None, description: str | None) -> bool:
    """Whether a finished line scored this description (a re-explained latent is scored again)."""
    if scores is None:
        return False
    if not (description or "").strip():
        return scores.error == NO_DESCRIPTION
    return (scores.simulator or {}).get("description_sha256") == description_sha(description)


def pending_keys(records: Sequence[FeatureRecord], descriptions: dict[Key, str],
                 out_path: str | Path | None) -> list[Key]:
    """Latents not yet scored with their current description in out_path."""
    done = load_finished(out_path) if out_path and Path(out_path).exists() else {}
    return [r.key for r in records if not is_current(done.get(r.key), descriptions.get(r.key))]


async def score_latent_methods(client, records: Sequence[FeatureRecord], descriptions: dict[Key, str],
                               settings: ScoreSettings, pool: Sequence[FeatureRecord],
                               origin: dict[Key, Key] | None = None) -> list[Scores]:
    """All requested methods for a few latents, method by method (one template at a time)."""
    plans = {r.key: plan_examples(r, settings, pool) for r in records}
    results: dict[Key, dict[str, MethodResult]] = {r.key: {} for r in records}
    for method, scorer in SCORERS.items():
        if method not in settings.methods:
            continue
        coros = [scorer.score(client, descriptions[r.key], plans[r.key], settings,
                              random.Random(f"{method}:{settings.seed}:{r.checkpoint_step}:{r.feature}"))
                 for r in records]
        if scorer.one_at_a_time(settings):  # one latent at a time: prompt cache
            outs = []
            for coro in coros:
                try:
                    outs.append(await coro)
                except Exception as exc:  # noqa: BLE001 - sorted below like gather's
                    outs.append(exc)
        else:
            outs = await asyncio.gather(*coros, return_exceptions=True)
        for r, out in zip(records, outs):
            if isinstance(out, (LLMAnswerError, RequestRejected)):
                out = MethodResult(None, error=str(out))
            elif isinstance(out, BaseException):
                raise out  # server down etc.: stop; finished latents are saved
            results[r.key][method] = out
    scored = []
    for r in records:
        description = descriptions[r.key]
        simulator: dict[str, Any] = {"model": getattr(client, "model", None),
                                     "description_sha256": description_sha(description),
                                     "examples": plans[r.key].counts(), "settings": settings.to_dict()}
        if origin and r.key in origin:
            simulator["description_from"] = list(origin[r.key])
        out = Scores(checkpoint_step=r.checkpoint_step, feature=r.feature, simulator=simulator, layer=r.key.layer)
        errors = []
        for method, result in results[r.key].items():
            setattr(out, method, None if result.value is None else round(result.value, 4))
            simulator[method] = result.info
            if result.ci95 is not None:
                out.ci95[method] = result.ci95
            if result.auc is not None:
                out.auc[method] = result.auc
            if result.error:
                errors.append(f"{method}: {result.error}")
        out.error = "; ".join(errors) or None
        scored.append(out)
    return scored


def score_records(records: Sequence[FeatureRecord], descriptions: dict[Key, str], client,
                  out_path: str | Path | None = None, settings: ScoreSettings | None = None,
                  on_done: Callable[[Scores], None] | None = None, *,
                  pool: Sequence[FeatureRecord] | None = None,
                  origin: dict[Key, Key] | None = None) -> list[Scores]:
    """Scores for every record (in records' order), appended to out_path as each chunk finishes.

    descriptions: (checkpoint_step, feature) -> description. Latents already in out_path with the
    same description are not scored again (a stopped run resumes; a re-explained latent is
    re-scored); a latent without a description gets a line with an error and no request.
    pool: the records other-latent negatives are drawn from (default: records; the control
    passes the full set so its examples equal the matched run's). origin: key -> the latent the
    description came from (the control's), kept in each line."""
    settings = settings or ScoreSettings()
    settings.validate()
    pool = records if pool is None else pool
    done = load_finished(out_path) if out_path and Path(out_path).exists() else {}
    pending = [r for r in records if not is_current(done.get(r.key), descriptions.get(r.key))]
    if pending:
        run = getattr(client, "run", asyncio.run)  # LLMClient.run also closes its connections in that loop
        run(_score_pending(pending, descriptions, client, settings, pool, origin, done, out_path, on_done))
    return [done[r.key] for r in records]


async def _score_pending(pending, descriptions, client, settings, pool, origin, done, out_path, on_done) -> None:
    with ResultSink(done, out_path, on_done) as sink:
        described = []
        for r in pending:
            if (descriptions.get(r.key) or "").strip():
                described.append(r)
            else:
                sink.add(Scores(r.checkpoint_step, r.feature, error=NO_DESCRIPTION, layer=r.key.layer))
        for i in range(0, len(described), settings.chunk):
            chunk = described[i:i + settings.chunk]
            for s in await score_latent_methods(client, chunk, descriptions, settings, pool, origin):
                sink.add(s)


def read_descriptions(path: Path) -> dict[Key, str]:
    """Key -> description from an explanations.jsonl (one object a line)."""
    out: dict[Key, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out[row_key(d)] = d.get("description") or ""
        except (ValueError, KeyError, TypeError):
            continue  # a line cut off by a crash of the explainer: that latent has no description
    return out


def summary_line(path: Path, scores: Sequence[Scores]) -> str:
    parts = []
    for method in METHODS:
        values = [getattr(s, method) for s in scores if getattr(s, method) is not None]
        if values:
            parts.append(f"{method} {np.mean(values):.3f}")
        aucs = [(s.auc or {}).get(method) for s in scores if (s.auc or {}).get(method) is not None]
        if aucs:
            parts.append(f"{method} AUC {np.mean(aucs):.3f}")
    return f"{path}: {len(scores)} latents, mean " + (", ".join(parts) or "(nothing scored)")
