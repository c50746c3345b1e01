"""OpenAI's all-at-once simulation (automated-interpretability): from the description alone the
simulator predicts an activation 0..9 for every token of the held-out windows; the score is the
Pearson correlation over all tokens pooled, its interval a seeded bootstrap over windows.

The scale stops at 9, not OpenAI's 10, so that every level is one token: SmolLM2, Gemma and
Qwen split "10" into "1" "0", and an expected value over the first token's alternatives would
read the simulator's strongest prediction as 1. The windows go into the prompt in a seeded
shuffled order, so that a drift of the predictions along the prompt cannot pass for a score.

Three ways to read the predictions (`ScoreSettings.simulation`):
- "prompt-logprobs" (vLLM): one completions request with prompt_logprobs over a prompt in which
  every token is followed by a tab and "unknown"; the prediction is the expected value over the
  "0".."9" alternatives at each "unknown" -- one prefill pass, no generation.
- "per-token" (llama.cpp, which returns no prompt logprobs): that prompt cut after each token's
  tab, one request per token, each earlier token's "unknown" replaced by the simulator's own most
  likely level (a small model shown "unknown" lines copies "unknown"); the server's prompt cache
  keeps the shared prefix.
- "json" (any chat server): the simulator answers a JSON list of integers; the expected value
  over the digit top_logprobs at each number where returned.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from typing import Any

from autointerp.interp.scorers.base import MethodResult, Scorer
from autointerp.display import shown
from autointerp.interp.scorers.examples import ExamplePlan, Window
from autointerp.interp.scorers.metrics import bootstrap_ci, correlation
from autointerp.interp.scorers.settings import ScoreSettings
from autointerp.llm.client import json_response_format, parse_json_answer
from autointerp.llm.prompts import prompt_sha256, render

JSON_TEMPLATE = "simulate"  # the "json" mode's chat prompt
ALL_AT_ONCE_TEMPLATE = "simulate_all_at_once"  # the "prompt-logprobs" and "per-token" modes' prompt
MAX_LEVEL = 9  # the prompts' scale 0..9: one token per level in any tokenizer (see above)


def level_weights(top_logprobs: dict[str, float]) -> dict[int, float]:
    """Probability of each level 0..MAX_LEVEL among the alternatives (" 7" and "7" pooled)."""
    weights: dict[int, float] = {}
    for token, logprob in top_logprobs.items():
        text = (token or "").strip()
        if text.isascii() and text.isdigit() and int(text) <= MAX_LEVEL:
            weights[int(text)] = weights.get(int(text), 0.0) + math.exp(logprob)
    return weights


def mean_level(weights: dict[int, float]) -> float | None:
    """The weights' expected level (renormalised); None if there are none."""
    total = sum(weights.values())
    return sum(k * w for k, w in weights.items()) / total if total > 0 else None


def expected_level(top_logprobs: dict[str, float]) -> float | None:
    """Expected level over the alternatives that are levels 0..MAX_LEVEL (renormalised); None if none are."""
    return mean_level(level_weights(top_logprobs))


def sim_windows(plan: ExamplePlan, settings: ScoreSettings) -> list[Window]:
    """The simulation's windows: each example narrowed to sim_window tokens either side."""
    out = []
    for w in plan.activating + plan.non_activating:
        lo = max(0, w.center - settings.sim_window)
        hi = min(len(w.tokens), w.center + settings.sim_window + 1)
        out.append(Window(w.tokens[lo:hi], w.levels[lo:hi], w.activating, w.kind, w.center - lo))
    return [w for w in out if w.tokens]


def simulation_predictions(text: str, logprobs: list | None, n: int) -> tuple[list[float], str]:
    """Per-token predictions from an answer {"activations": [...]}: logprob expected values where
    the generated number is one token with digit alternatives, the parsed integer otherwise."""
    values = parse_json_answer(text).get("activations", [])
    parsed = [float(min(max(int(v), 0), MAX_LEVEL)) if isinstance(v, (int, float)) else 0.0 for v in values][:n]
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
    for i, m in enumerate(re.finditer(r"[0-9]+(?:\.[0-9]+)?", array.group(1))):
        if i >= n:
            break
        lp = starts.get(array.start(1) + m.start())
        ev = expected_level(lp.top) if lp is not None and lp.token.strip() == m.group(0) and lp.top else None
        used += ev is not None
        out.append(ev if ev is not None else parsed[i])
    out += parsed[len(out):]
    return out, "logprobs" if used else "json"


def _object_schema(key: str, n: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: {"type": "array", "items": item, "minItems": n, "maxItems": n}},
            "required": [key], "additionalProperties": False}


async def _simulate_json(client, description: str, windows: list[Window], settings: ScoreSettings) -> list[float]:
    """One chat request: the simulator lists an integer 0..MAX_LEVEL per token, text after text."""
    texts = [[shown(t, "prompt").replace("|", "¦") for t in w.tokens] for w in windows]
    index = sum(len(t) for t in texts)
    prompt = render(JSON_TEMPLATE, description=description, texts=texts, n_tokens=index)
    schema = _object_schema("activations", index, {"type": "integer", "minimum": 0, "maximum": MAX_LEVEL})
    result = await client.chat([{"role": "user", "content": prompt}], template_sha=prompt_sha256(JSON_TEMPLATE),
                               response_format=json_response_format(schema, "simulation"),
                               max_tokens=6 * index + 64, temperature=0.0, logprobs=True,
                               top_logprobs=settings.top_logprobs)
    if result.truncated:  # a cut-short list would be padded with zeros: not a prediction
        raise ValueError("answer cut short by max_tokens")
    predicted, _ = simulation_predictions(result.text, result.logprobs, index)
    return predicted


def all_at_once_prompt(description: str, windows: list[Window]) -> tuple[str, list[int]]:
    """OpenAI's all-at-once prompt: every token then a tab and "unknown"; with the character
    offset of each token's tab, in order."""
    prompt = render(ALL_AT_ONCE_TEMPLATE, description=description,
                    windows=[[shown(t, "prompt") for t in w.tokens] for w in windows])
    # The template writes "\tunknown" only in the slots to fill (token text never holds a tab).
    return prompt, [m.start() for m in re.finditer("\tunknown", prompt)]


def _entry_token(entry: Any) -> str:
    return (entry.get("decoded_token") if isinstance(entry, dict) else getattr(entry, "decoded_token", "")) or ""


def _entry_logprob(entry: Any) -> float:
    return float(entry.get("logprob") if isinstance(entry, dict) else getattr(entry, "logprob"))


def predictions_from_prompt_logprobs(prompt_logprobs: list | None, n: int | None) -> list[float]:
    """Expected levels at the n "unknown" slots of an all-at-once prompt, from vLLM's
    prompt_logprobs (one entry per prompt token: None for the first, else {token id: {logprob,
    rank, decoded_token}} whose first key is the prompt's own token, then the top alternatives).
    A slot is a token spelling the start of "unknown" right after a tab (or a token "\\tunknown");
    its alternatives "0".."9" give the expected value."""
    if not prompt_logprobs:
        raise ValueError("the server returned no prompt_logprobs (is it vLLM? use --simulation json)")
    actual = []
    for position in prompt_logprobs:
        if not position:
            actual.append(("", {}))
            continue
        entries = list(position.values()) if isinstance(position, dict) else list(position)
        alternatives = {}
        for entry in entries:
            token = _entry_token(entry)
            alternatives[token] = max(alternatives.get(token, -math.inf), _entry_logprob(entry))
        actual.append((_entry_token(entries[0]), alternatives))
    out = []
    for i, (token, alternatives) in enumerate(actual):
        after_tab = i > 0 and actual[i - 1][0].endswith("\t")
        starts_slot = (after_tab and token.strip() and "unknown".startswith(token.strip()[:7])
                       and token.strip()[:3] == "unk") or token.startswith("\tunk")
        if starts_slot:
            ev = expected_level(alternatives)
            out.append(0.0 if ev is None else ev)  # no digit among the top alternatives: "not firing"
    if n is not None and len(out) != n:
        raise ValueError(f"found {len(out)} 'unknown' slots in the prompt logprobs for {n} tokens")
    return out


def slot_predictions(result) -> list[float]:
    """The expected levels at the "unknown" slots of an all-at-once answer (what the response
    cache keeps of its prompt logprobs)."""
    return predictions_from_prompt_logprobs(result.prompt_logprobs, None)


async def _simulate_prompt_logprobs(client, description: str, windows: list[Window],
                                    settings: ScoreSettings) -> list[float]:
    """One completions request, no generation to speak of (max_tokens 1): vLLM's prompt_logprobs."""
    prompt, slots = all_at_once_prompt(description, windows)
    result = await client.complete(prompt, template_sha=prompt_sha256(ALL_AT_ONCE_TEMPLATE),
                                   max_tokens=1, temperature=0.0,
                                   extra_body={"prompt_logprobs": settings.top_logprobs},
                                   reduce=slot_predictions)  # N alternatives at every prompt token: MBs an answer
    if len(result.reduced) != len(slots):
        raise ValueError(f"found {len(result.reduced)} 'unknown' slots in the prompt logprobs for {len(slots)} tokens")
    return result.reduced


async def _simulate_per_token(client, description: str, windows: list[Window],
                              settings: ScoreSettings) -> list[float]:
    """The all-at-once prompt without echo (llama.cpp returns no prompt logprobs): one completions
    request per token, its prompt cut right after that token's tab, max_tokens 1 with top logprobs,
    each earlier token's "unknown" replaced by the simulator's most likely level there. The
    server's prompt cache keeps the shared prefix, so each request evaluates only the few tokens
    since the previous one: as long as nothing else runs on the server in between (the caller runs
    these one latent at a time)."""
    prompt, slots = all_at_once_prompt(description, windows)
    sha = prompt_sha256(ALL_AT_ONCE_TEMPLATE)
    out, head, done = [], "", 0
    for offset in slots:
        head += prompt[done:offset + 1]  # up to and with this token's tab
        done = offset + len("\tunknown")
        result = await client.complete(head, template_sha=sha, max_tokens=1, temperature=0.0,
                                       logprobs=settings.top_logprobs)
        weights = level_weights(result.logprobs[0].top or {}) if result.logprobs else {}
        ev = mean_level(weights)
        out.append(0.0 if ev is None else ev)  # no digit among the top alternatives: "not firing"
        head += str(max(weights, key=weights.get, default=0))
    return out


# ScoreSettings.simulation -> how that mode asks for one chunk of windows' predictions
PREDICT_BY_MODE = {"prompt-logprobs": _simulate_prompt_logprobs, "per-token": _simulate_per_token,
                   "json": _simulate_json}


class Simulation(Scorer):
    name = "simulation"
    templates = (JSON_TEMPLATE, ALL_AT_ONCE_TEMPLATE)

    def one_at_a_time(self, settings: ScoreSettings) -> bool:
        """Per token: one latent at a time, so each request extends the previous one's prompt in
        the server's cache."""
        return settings.simulation == "per-token"

    async def score(self, client, description: str, plan: ExamplePlan, settings: ScoreSettings,
                    rng: random.Random) -> MethodResult:
        windows = sim_windows(plan, settings)
        rng.shuffle(windows)  # activating first would tie the truth to the position in the prompt
        if len({v for w in windows for v in w.levels}) < 2:
            return MethodResult(None, error="no held-out tokens with varying activation")
        chunks = [windows[i:i + settings.sim_per_prompt] for i in range(0, len(windows), settings.sim_per_prompt)]
        ask = PREDICT_BY_MODE[settings.simulation]
        answers = await asyncio.gather(*(ask(client, description, c, settings) for c in chunks),
                                       return_exceptions=True)
        pairs, failed = [], []  # (predicted, true) per window
        for chunk, answer in zip(chunks, answers):
            if isinstance(answer, (ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError)):
                failed.append(f"{type(answer).__name__}: {answer}")
                continue
            if isinstance(answer, BaseException):
                raise answer
            pos = 0
            for w in chunk:
                pairs.append((answer[pos:pos + len(w.tokens)], w.levels))
                pos += len(w.tokens)
        info = {"metric": "pearson", "mode": settings.simulation, "n_activating": len(plan.activating),
                "n_non_activating": len(plan.non_activating), "n_prompts": len(chunks),
                "n_tokens": sum(len(t) for _, t in pairs)}
        if not pairs:
            return MethodResult(None, info, error=f"simulation answer unreadable: {failed[0]}")

        def pooled(sample):
            return correlation([v for p, _ in sample for v in p], [v for _, t in sample for v in t])

        value = pooled(pairs)
        ci = bootstrap_ci([pairs], pooled, settings.bootstrap, f"ci:{settings.seed}:simulation:{rng.random()}")
        return MethodResult(value, info, ci,
                            error=f"{len(failed)} prompt(s) unreadable: {failed[0]}" if failed else None)
