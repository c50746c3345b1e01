"""Scorers: how well a latent's description predicts where it fires, and a control that says
whether those scores carry any signal.

Every method works on held-out material: the explainer sees the even-ranked top contexts, the
scorers the odd-ranked ones (`split_contexts`). Per latent (`plan_examples`, seeded by the latent,
never by its description, so a matched and a shuffled description see the same examples):
activating windows drawn across the activation quantiles of the held-out contexts (delphi's
split: equal-count bins from the top down, as many from each), and as many non-activating
windows (the record's negatives where the latent never fires: "same-token" and "random"; other
latents' top windows with levels 0 where a record has too few).

- detection (delphi): the windows shuffled, 5 per prompt; the simulator answers a list of 0/1
  ("[1,0,0,1,0]", a JSON-schema array). Score: balanced accuracy; AUC from P("1") at each answer
  position where the server returns logprobs.
- fuzzing (delphi): the activating windows with their active tokens marked <<like this>>, the
  non-activating ones with as many tokens marked; the simulator says which markings fit.
- simulation (OpenAI automated-interpretability, all at once): a predicted activation 0..10 for
  every token; the score is the Pearson correlation over all tokens pooled. On vLLM
  ("prompt-logprobs"): one completions request with prompt_logprobs over a prompt in which every
  token is followed by a tab and "unknown"; the prediction is the expected value over the
  "0".."10" alternatives at each "unknown" -- one prefill pass, no generation. Elsewhere ("json",
  llama.cpp, which returns no prompt logprobs): the simulator answers a JSON list of integers;
  the expected value over the digit top_logprobs at each number where returned.

`Scores.ci95`: a seeded bootstrap 95% interval per latent and method (items resampled within each
class for detection/fuzzing, windows for simulation). `run_control` scores a seeded sample of
latents again with other latents' descriptions (a seeded derangement) and says, per method,
whether the matched descriptions beat the shuffled ones (paired gap, bootstrap interval over
latents).

Requests go method by method over chunks of latents, so a one-slot llama.cpp server keeps each
prompt's few-shot prefix in its cache. Scores stream to step-N/scores.jsonl (the control's to
their own file), one line per latent, so a stopped run resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autointerp import run as run_lib
from autointerp.labels import sampling
from autointerp.errors import UserError
from autointerp.labels.language import clean_token
from autointerp.options import renamed
from autointerp.llm.client import LLMAnswerError, RequestRejected, ResultSink, json_response_format, parse_json_answer
from autointerp.llm.prompts import prompt_sha256, render
from autointerp.jsonl import read_finished
from autointerp.schema import Context, FeatureRecord, Key, Scores, row_key


METHODS = ("simulation", "detection", "fuzzing")
PHASES = ("detection", "fuzzing", "simulation")  # request order: one template at a time
TEMPLATES = {"detection": "detect", "fuzzing": "fuzz", "simulation": "simulate",
             "simulation-prompt-logprobs": "simulate_all_at_once"}
SIMULATION_MODES = ("per-token", "json", "prompt-logprobs")
NO_DESCRIPTION = "no description to score"
MIN_CONTROL_PAIRS = 10  # latents scored both ways before the control may call a method informative


# ---- settings ------------------------------------------------------------------------------------

@dataclass
class ScoreSettings:
    """How many examples each method shows and how. `for_engine` gives the defaults: on vLLM
    delphi's 50 + 50 with simulation from prompt logprobs; on a CPU (llama.cpp) 10 + 10, the most
    that keeps `make demo` within its time (the issue's floor), simulation token by token; any
    other OpenAI-compatible server 10 + 10 with the JSON simulation (no prompt cache assumed)."""

    n_activating: int = 10  # activating windows per method, drawn across activation quantiles
    n_non_activating: int = 10  # non-activating windows per method
    per_prompt: int = 5  # detection/fuzzing examples per prompt (delphi's 5)
    n_quantiles: int = 5  # activation bins the activating windows are drawn from
    window: int = 3  # detection/fuzzing: tokens shown either side of the window's centre
    sim_window: int = 1  # simulation: tokens either side of the centre
    sim_per_prompt: int = 20  # simulation windows per prompt (all tokens are pooled over prompts)
    # "per-token" (llama.cpp: the all-at-once prompt cut after each token, prefix-cached), "json"
    # (any chat server: a JSON list answer + top_logprobs), "prompt-logprobs" (vLLM: one prefill pass)
    simulation: str = "per-token"
    top_logprobs: int = 10
    fuzz_threshold: float = 0.3  # a token is marked active at >= this share of its window's max (delphi)
    methods: tuple[str, ...] = METHODS
    chunk: int = 8  # latents per method-major round of requests
    bootstrap: int = 1000  # resamples for the per-latent 95% intervals
    seed: int = 0

    @classmethod
    def for_engine(cls, engine: str | None, **overrides: Any) -> "ScoreSettings":
        """Defaults by engine ("vllm" or anything else), then the overrides that are not None."""
        if engine == "vllm":
            base = cls(n_activating=50, n_non_activating=50, window=16, sim_window=8, sim_per_prompt=20,
                       simulation="prompt-logprobs", top_logprobs=20, chunk=64)
        elif engine in (None, "llama-cpp"):
            base = cls()
        else:
            base = cls(simulation="json")
        settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.simulation not in SIMULATION_MODES:
            raise UserError(f"unknown simulation mode {self.simulation!r}; choose from {', '.join(SIMULATION_MODES)}")
        if bad := [m for m in self.methods if m not in METHODS]:
            raise UserError(f"unknown scoring method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        for name in ("n_activating", "n_non_activating", "per_prompt", "n_quantiles", "sim_per_prompt", "chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"methods": list(self.methods)}


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
    """Mean of the recall on positives and on negatives (0.5 for any constant guesser); plain
    accuracy when only one class is present."""
    t, p = np.asarray(true, dtype=bool), np.asarray(predicted, dtype=bool)
    if t.size != p.size:
        raise ValueError(f"{p.size} answers for {t.size} items")
    if t.size == 0:
        return 0.0
    if t.all() or not t.any():
        return float((t == p).mean())
    return float(((p[t]).mean() + (~p[~t]).mean()) / 2)


def auc(true: Sequence[bool], probability: Sequence[float]) -> float | None:
    """Area under the ROC curve: the chance that a random positive gets a higher probability than
    a random negative, ties counting half (Mann-Whitney). None without both classes."""
    t, p = np.asarray(true, dtype=bool), np.asarray(probability, dtype=np.float64)
    pos, neg = p[t], p[~t]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def percentile_interval(values: Sequence[float]) -> list[float]:
    """The 2.5th and 97.5th percentiles of bootstrap replicates."""
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def bootstrap_ci(groups: Sequence[Sequence[Any]], statistic: Callable[..., float | None], n: int,
                 seed: int | str) -> list[float] | None:
    """Seeded percentile bootstrap 95% interval of statistic(*groups): each group is resampled
    with replacement on its own (stratified), e.g. (positives, negatives) or (windows,).
    Replicates where the statistic is undefined (None) are dropped; None if all are."""
    rng = np.random.default_rng(_seed_int(seed))
    values = []
    for _ in range(n):
        sample = [[g[i] for i in rng.integers(0, len(g), len(g))] if len(g) else [] for g in groups]
        value = statistic(*sample)
        if value is not None and not math.isnan(value):
            values.append(value)
    return percentile_interval(values) if values else None


def _seed_int(seed: int | str) -> int:
    return int(hashlib.sha256(str(seed).encode()).hexdigest()[:16], 16)


def expected_level(top_logprobs: dict[str, float]) -> float | None:
    """Expected level over the alternatives that are integers 0..10 (renormalised); None if none are."""
    weights: dict[int, float] = {}
    for token, logprob in top_logprobs.items():
        text = (token or "").strip()
        if text.isascii() and text.isdigit() and 0 <= int(text) <= 10:
            weights[int(text)] = weights.get(int(text), 0.0) + math.exp(logprob)
    total = sum(weights.values())
    return sum(k * w for k, w in weights.items()) / total if total > 0 else None


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random permutation with no fixed point (perm[i] != i for every i); n >= 2."""
    if n < 2:
        raise ValueError(f"no derangement of {n} item(s)")
    while True:  # rejection: about e tries on average
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def shuffled_assignment(texts: Sequence[str], rng: random.Random, tries: int = 200) -> list[int]:
    """A derangement that also avoids handing a latent a description equal to its own text where
    possible (two latents with the same description would make a shuffle that changes nothing);
    the derangement with the fewest equal texts among `tries`."""
    best, best_equal = None, None
    for _ in range(tries):
        perm = derangement(len(texts), rng)
        equal = sum(texts[p] == texts[i] for i, p in enumerate(perm))
        if best_equal is None or equal < best_equal:
            best, best_equal = perm, equal
        if equal == 0:
            break
    return best


# ---- held-out examples ---------------------------------------------------------------------------

@dataclass
class Window:
    """A slice of a context shown to the scorer: tokens, their levels, and what it is."""

    tokens: list[str]
    levels: list[int]
    activating: bool
    kind: str  # "quantile-<i>" (0 = top bin) | "same-token" | "random" | "other-latents"
    center: int  # index (in tokens) of the max token, or of the anchor token of a negative

    @property
    def peak(self) -> int:
        return max(self.levels, default=0)


@dataclass
class ExamplePlan:
    """One latent's held-out examples (the same for every description it is scored with)."""

    activating: list[Window]
    non_activating: list[Window]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.activating + self.non_activating:
            out[w.kind] = out.get(w.kind, 0) + 1
        return out


def split_contexts(record: FeatureRecord) -> tuple[list[Context], list[Context]]:
    """(explainer's contexts, scorers' held-out contexts): even-ranked vs odd-ranked."""
    return record.contexts[0::2], record.contexts[1::2]


def _fires(context: Context) -> bool:
    return any(v > 0 for v in context.levels)


def _peak(context: Context) -> float:
    values = context.activations if context.activations is not None else context.levels
    return max(values, default=0)


def quantile_sample(contexts: Sequence[Context], n: int, n_quantiles: int,
                    rng: random.Random) -> list[tuple[int, Context]]:
    """n activating contexts drawn across activation quantiles (delphi): sorted by peak
    activation, cut into n_quantiles equal-count bins from the top down, n // n_quantiles drawn
    at random from each (the remainder spread over the bins); a bin short of contexts leaves its
    share to the others. Returns (bin, context), bin 0 the top."""
    live = sorted((c for c in contexts if _fires(c)), key=_peak, reverse=True)
    if len(live) <= n:
        q = max(1, min(n_quantiles, len(live)))
        return [(i * q // max(len(live), 1), c) for i, c in enumerate(live)]
    q = min(n_quantiles, len(live))
    bins = [list(b) for b in np.array_split(np.arange(len(live)), q)]
    quota = [n // q + (1 if i < n % q else 0) for i in range(q)]
    chosen: list[tuple[int, int]] = []
    spare: list[tuple[int, int]] = []
    for b, (members, k) in enumerate(zip(bins, quota)):
        picked = rng.sample(members, min(k, len(members)))
        chosen += [(b, i) for i in picked]
        spare += [(b, i) for i in members if i not in picked]
    if len(chosen) < n:
        chosen += rng.sample(spare, n - len(chosen))
    return [(b, live[i]) for b, i in sorted(chosen, key=lambda x: x[1])]


def cut_window(context: Context, center: int, width: int, activating: bool, kind: str) -> Window:
    """The tokens within `width` of `center`."""
    center = min(max(center, 0), max(len(context.tokens) - 1, 0))
    lo, hi = max(0, center - width), min(len(context.tokens), center + width + 1)
    levels = list(context.levels[lo:hi]) if activating else [0] * (hi - lo)
    return Window(list(context.tokens[lo:hi]), levels, activating, kind, center - lo)


def top_token(record: FeatureRecord) -> str | None:
    """The token at the max of the latent's top context (what "same-token" negatives contain)."""
    for c in record.contexts:
        if c.max_index >= 0 and _fires(c):
            return c.tokens[c.max_index]
    return None


def plan_examples(record: FeatureRecord, settings: ScoreSettings,
                  pool: Sequence[FeatureRecord] = ()) -> ExamplePlan:
    """The latent's activating and non-activating windows, seeded by the latent only."""
    rng = random.Random(f"examples:{settings.seed}:{record.checkpoint_step}:{record.feature}")
    _, held_out = split_contexts(record)
    activating = [cut_window(c, c.max_index, settings.window, True, f"quantile-{b}")
                  for b, c in quantile_sample(held_out, settings.n_activating, settings.n_quantiles, rng)]
    kinds = list(record.extra.get("negative_kinds") or [])
    anchor = top_token(record)
    own = []
    for i, c in enumerate(record.negatives):
        if not c.tokens or _fires(c):  # "similar" negatives still fire: no non-activating example
            continue
        kind = kinds[i] if i < len(kinds) else "random"
        kind = kind if kind in ("same-token", "random") else "random"
        center = c.tokens.index(anchor) if kind == "same-token" and anchor in c.tokens else rng.randrange(len(c.tokens))
        own.append(cut_window(c, center, settings.window, False, kind))
    rng.shuffle(own)
    # hard negatives (the latent's own top token, silent) up to half, random contexts for the rest
    same = [w for w in own if w.kind == "same-token"][:settings.n_non_activating // 2]
    rest = [w for w in own if w.kind != "same-token" or w not in same]
    non_activating = same + [w for w in rest if w not in same][:settings.n_non_activating - len(same)]
    missing = settings.n_non_activating - len(non_activating)
    if missing > 0:  # other latents' top windows, assumed silent for this latent (an approximation)
        others = [o for o in pool if o.checkpoint_step == record.checkpoint_step and o.key != record.key
                  and o.contexts]
        for o in rng.sample(others, min(missing, len(others))):
            c = o.contexts[0]
            non_activating.append(cut_window(c, c.max_index, settings.window, False, "other-latents"))
    return ExamplePlan(activating, non_activating)


def shown_text(tokens: Sequence[str], marked: set[int] | frozenset = frozenset()) -> str:
    """Tokens as one line of text; runs of marked tokens between << and >> (delphi's format)."""
    parts, open_ = [], False
    for i, token in enumerate(tokens):
        text = clean_token(token).replace("\r", "").replace("\n", "↵").replace("\t", " ")
        if i in marked and not open_:
            parts.append("<<")
            open_ = True
        elif i not in marked and open_:
            parts.append(">>")
            open_ = False
        parts.append(text)
    if open_:
        parts.append(">>")
    return "".join(parts)


def shown_token(token: str) -> str:
    return clean_token(token).replace("\r", "").replace("\n", "↵").replace("\t", " ")


# ---- prompts as chat messages --------------------------------------------------------------------

_ROLE_LINE = re.compile(r"^=== (system|user|assistant) ===$", re.M)


def chat_messages(text: str) -> list[dict[str, str]]:
    """A rendered template with `=== role ===` lines -> chat messages (few-shot turns)."""
    parts = _ROLE_LINE.split(text)
    if len(parts) < 3:
        return [{"role": "user", "content": text.strip()}]
    return [{"role": role, "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


# ---- detection and fuzzing -----------------------------------------------------------------------

@dataclass
class Item:
    text: str
    activating: bool
    kind: str


@dataclass
class MethodResult:
    value: float | None
    info: dict[str, Any] = field(default_factory=dict)
    ci95: list[float] | None = None
    auc: float | None = None
    error: str | None = None


def detection_items(plan: ExamplePlan) -> list[Item]:
    return [Item(shown_text(w.tokens), w.activating, w.kind) for w in plan.activating + plan.non_activating]


def fuzzing_items(plan: ExamplePlan, settings: ScoreSettings, rng: random.Random) -> list[Item]:
    """Activating windows with the tokens at >= fuzz_threshold of the window's peak marked (right),
    non-activating ones with as many tokens marked: the centre (a same-token negative's shared
    token) and random others (wrong). delphi's default fuzzing."""
    items, marked_counts = [], []
    for w in plan.activating:
        cut = max(1, math.ceil(settings.fuzz_threshold * w.peak))
        marked = {i for i, v in enumerate(w.levels) if v >= cut}
        marked_counts.append(len(marked))
        items.append(Item(shown_text(w.tokens, marked), True, w.kind))
    n_wrong = max(1, math.ceil(sum(marked_counts) / len(marked_counts))) if marked_counts else 1
    for w in plan.non_activating:
        others = [i for i in range(len(w.tokens)) if i != w.center]
        marked = {w.center, *rng.sample(others, min(n_wrong - 1, len(others)))}
        items.append(Item(shown_text(w.tokens, marked), False, w.kind))
    return items


def answer_schema(n: int) -> dict[str, Any]:
    """A list of n numbers, each 0 or 1 (a bare JSON array: the few-shot answers' form)."""
    return {"type": "array", "items": {"type": "integer", "enum": [0, 1]}, "minItems": n, "maxItems": n}


def parse_binary_answer(text: str, logprobs: list | None, n: int) -> tuple[list[bool], list[float] | None]:
    """(answers, P("1") per answer) from a list answer like "[1,0,0,1,0]". P("1") at each answer
    position is P(1) / (P(0) + P(1)) over the top alternatives there (delphi); where neither is
    among them, the chosen digit (1.0 or 0.0). Probabilities are None when the answer's tokens
    cannot be lined up with its items (no logprobs, or a digit split over tokens)."""
    match = re.search(r"\[[^\]]*\]", text)
    if match is None:
        raise ValueError(f"no list in the answer {text[:60]!r}")
    values = json.loads(match.group(0))
    if not isinstance(values, list) or len(values) != n:
        raise ValueError(f"expected a list of {n} answers, got {match.group(0)[:60]!r}")
    answers = []
    for v in values:
        if v in (0, 1) or isinstance(v, bool):
            answers.append(bool(v))
        else:
            raise ValueError(f"answer {v!r} is not 0 or 1")
    if not logprobs:
        return answers, None
    positions = [lp for lp in logprobs if re.fullmatch(r"\D*[01]\D*", lp.token or "")]
    if len(positions) != n:
        return answers, None
    probabilities = []
    for lp, answer in zip(positions, answers):
        p0 = p1 = 0.0
        for token, logprob in (lp.top or {}).items():
            digits = re.sub(r"\D", "", token or "")
            if digits == "0":
                p0 += math.exp(logprob)
            elif digits == "1":
                p1 += math.exp(logprob)
        probabilities.append(p1 / (p0 + p1) if p0 + p1 > 0 else float(answer))
    return answers, probabilities


async def _classify(client, template: str, description: str, items: list[Item], settings: ScoreSettings,
                    rng: random.Random) -> MethodResult:
    """delphi's classifier: shuffled items, per_prompt a prompt, a 0/1 list per prompt."""
    if not any(i.activating for i in items) or all(i.activating for i in items):
        return MethodResult(None, error="needs activating and non-activating examples")
    order = list(range(len(items)))
    rng.shuffle(order)
    batches = [order[i:i + settings.per_prompt] for i in range(0, len(order), settings.per_prompt)]
    sha = prompt_sha256(template)

    async def ask(batch: list[int]):
        prompt = render(template, description=description, examples=[items[i].text for i in batch])
        result = await client.chat(chat_messages(prompt), template_sha=sha,
                                   response_format=json_response_format(answer_schema(len(batch)), "answers"),
                                   max_tokens=4 * len(batch) + 8, temperature=0.0, logprobs=True,
                                   top_logprobs=settings.top_logprobs)
        try:
            return parse_binary_answer(result.text, result.logprobs, len(batch))
        except (ValueError, TypeError) as exc:
            return exc

    answers = await asyncio.gather(*(ask(b) for b in batches))
    truth, predicted, probability, failed = [], [], [], []
    for batch, answer in zip(batches, answers):
        if isinstance(answer, Exception):
            failed.append(str(answer))
            continue
        hard, soft = answer
        truth += [items[i].activating for i in batch]
        predicted += hard
        probability += soft if soft is not None else [None] * len(batch)
    info = {"metric": "balanced accuracy", "n_activating": sum(i.activating for i in items),
            "n_non_activating": sum(not i.activating for i in items), "n_prompts": len(batches),
            "answered": len(truth)}
    if failed:
        info["unanswered_prompts"] = len(failed)
    if len(set(truth)) < 2:
        return MethodResult(None, info, error=f"no usable answers ({failed[0] if failed else 'one class only'})")
    value = balanced_accuracy(truth, predicted)
    pos = [(p, q) for t, p, q in zip(truth, predicted, probability) if t]
    neg = [(p, q) for t, p, q in zip(truth, predicted, probability) if not t]

    def ba(pos_sample, neg_sample):
        return balanced_accuracy([True] * len(pos_sample) + [False] * len(neg_sample),
                                 [p for p, _ in pos_sample] + [p for p, _ in neg_sample])

    seed = f"ci:{settings.seed}:{template}:{rng.random()}"
    ci = bootstrap_ci([pos, neg], ba, settings.bootstrap, seed)
    area = None
    if all(q is not None for q in probability):
        area = auc(truth, probability)

        def area_of(pos_sample, neg_sample):
            return auc([True] * len(pos_sample) + [False] * len(neg_sample),
                       [q for _, q in pos_sample] + [q for _, q in neg_sample])

        info["auc_ci95"] = bootstrap_ci([pos, neg], area_of, settings.bootstrap, seed + ":auc")
    return MethodResult(value, info, ci, None if area is None else round(area, 4),
                        f"{len(failed)} prompt(s) unanswered: {failed[0]}" if failed else None)


async def detect(client, description: str, plan: ExamplePlan, settings: ScoreSettings,
                 rng: random.Random) -> MethodResult:
    return await _classify(client, "detect", description, detection_items(plan), settings, rng)


async def fuzz(client, description: str, plan: ExamplePlan, settings: ScoreSettings,
               rng: random.Random) -> MethodResult:
    return await _classify(client, "fuzz", description, fuzzing_items(plan, settings, rng), settings, rng)


# ---- simulation ----------------------------------------------------------------------------------

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
    """One chat request: the simulator lists an integer 0..10 per token, text after text."""
    texts = [[shown_token(t).replace("|", "¦") for t in w.tokens] for w in windows]
    index = sum(len(t) for t in texts)
    prompt = render("simulate", description=description, texts=texts, n_tokens=index)
    schema = _object_schema("activations", index, {"type": "integer", "minimum": 0, "maximum": 10})
    result = await client.chat([{"role": "user", "content": prompt}], template_sha=prompt_sha256("simulate"),
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
    prompt = render(TEMPLATES["simulation-prompt-logprobs"], description=description,
                    windows=[[shown_token(t) for t in w.tokens] for w in windows])
    # The template writes "\tunknown" only in the slots to fill (token text never holds a tab).
    return prompt, [m.start() for m in re.finditer("\tunknown", prompt)]


def _entry_token(entry: Any) -> str:
    return (entry.get("decoded_token") if isinstance(entry, dict) else getattr(entry, "decoded_token", "")) or ""


def _entry_logprob(entry: Any) -> float:
    return float(entry.get("logprob") if isinstance(entry, dict) else getattr(entry, "logprob"))


def predictions_from_prompt_logprobs(prompt_logprobs: list | None, n: int) -> list[float]:
    """Expected levels at the n "unknown" slots of an all-at-once prompt, from vLLM's
    prompt_logprobs (one entry per prompt token: None for the first, else {token id: {logprob,
    rank, decoded_token}} whose first key is the prompt's own token, then the top alternatives).
    A slot is a token spelling the start of "unknown" right after a tab (or a token "\\tunknown");
    its alternatives "0".."10" give the expected value."""
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
    if len(out) != n:
        raise ValueError(f"found {len(out)} 'unknown' slots in the prompt logprobs for {n} tokens")
    return out


async def _simulate_prompt_logprobs(client, description: str, windows: list[Window],
                                    settings: ScoreSettings) -> list[float]:
    """One completions request, no generation to speak of (max_tokens 1): vLLM's prompt_logprobs."""
    prompt, slots = all_at_once_prompt(description, windows)
    result = await client.complete(prompt, template_sha=prompt_sha256(TEMPLATES["simulation-prompt-logprobs"]),
                                   max_tokens=1, temperature=0.0,
                                   extra_body={"prompt_logprobs": settings.top_logprobs},
                                   cache=False)  # N alternatives at every prompt token: MBs an answer
    return predictions_from_prompt_logprobs(result.prompt_logprobs, len(slots))


async def _simulate_per_token(client, description: str, windows: list[Window],
                              settings: ScoreSettings) -> list[float]:
    """The all-at-once prompt without echo (llama.cpp returns no prompt logprobs): one completions
    request per token, its prompt cut right after that token's tab, max_tokens 1 with top logprobs;
    the next-token distribution there is what prompt_logprobs gives at its "unknown". The server's
    prompt cache keeps the shared prefix, so each request evaluates only the few tokens since the
    previous one: as long as nothing else runs on the server in between (the caller runs these
    one latent at a time)."""
    prompt, slots = all_at_once_prompt(description, windows)
    sha = prompt_sha256(TEMPLATES["simulation-prompt-logprobs"])
    out = []
    for offset in slots:
        result = await client.complete(prompt[:offset + 1], template_sha=sha, max_tokens=1, temperature=0.0,
                                       logprobs=settings.top_logprobs)
        first = result.logprobs[0] if result.logprobs else None
        ev = expected_level(first.top) if first is not None and first.top else None
        out.append(0.0 if ev is None else ev)  # no digit among the top alternatives: "not firing"
    return out


async def simulate(client, description: str, plan: ExamplePlan, settings: ScoreSettings,
                   rng: random.Random) -> MethodResult:
    windows = sim_windows(plan, settings)
    if len({v for w in windows for v in w.levels}) < 2:
        return MethodResult(None, error="no held-out tokens with varying activation")
    chunks = [windows[i:i + settings.sim_per_prompt] for i in range(0, len(windows), settings.sim_per_prompt)]
    ask = {"prompt-logprobs": _simulate_prompt_logprobs, "per-token": _simulate_per_token,
           "json": _simulate_json}[settings.simulation]
    answers = await asyncio.gather(*(ask(client, description, c, settings) for c in chunks), return_exceptions=True)
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
    return MethodResult(value, info, ci, error=f"{len(failed)} prompt(s) unreadable: {failed[0]}" if failed else None)


# ---- many latents, resumable ---------------------------------------------------------------------

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
    for method in (m for m in PHASES if m in settings.methods):
        coros = []
        for r in records:
            description = descriptions[r.key]
            rng = random.Random(f"{method}:{settings.seed}:{r.checkpoint_step}:{r.feature}")
            if method == "detection":
                coros.append(detect(client, description, plans[r.key], settings, rng))
            elif method == "fuzzing":
                coros.append(fuzz(client, description, plans[r.key], settings, rng))
            else:
                coros.append(simulate(client, description, plans[r.key], settings, rng))
        if method == "simulation" and settings.simulation == "per-token":  # one latent at a time: prompt cache
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


# ---- the control ---------------------------------------------------------------------------------

@dataclass
class ControlResult:
    """Matched vs shuffled descriptions on the same latents and examples, per method."""

    methods: dict[str, dict[str, Any]]  # method -> metric, n, matched, shuffled, gap, ci95, verdict, signal
    n_latents: int
    model: str = ""
    seed: int = 0
    fraction: float = 0.2
    sample: list[list[int | None]] = field(default_factory=list)  # [checkpoint_step, feature] scored shuffled

    @property
    def noise(self) -> bool:
        """True when no method's gap interval lies above 0: the scores carry no signal."""
        return not any(m.get("signal") for m in self.methods.values())

    @property
    def verdict(self) -> str:
        if not self.methods:
            return "no control: no scored latents with a description"
        if self.noise:
            best = max(self.methods, key=lambda k: self.methods[k]["gap"] if self.methods[k].get("gap") is not None
                       else -9)
            m = self.methods[best]
            detail = (f"best: {best} gap {_num(m['gap'])}, 95% CI {_num(m['ci95'][0])}–{_num(m['ci95'][1])}; "
                      if m.get("gap") is not None else "")
            return (f"scores from {self.model or 'this model'} do not beat shuffled descriptions ({detail}"
                    f"{self.n_latents} latents): treat them as noise")
        return "; ".join(m["verdict"] for m in self.methods.values())

    def to_dict(self) -> dict[str, Any]:
        return {"methods": self.methods, "n_latents": self.n_latents, "model": self.model, "seed": self.seed,
                "fraction": self.fraction, "noise": self.noise, "verdict": self.verdict, "sample": self.sample}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlResult":
        return cls(methods=d.get("methods") or {}, n_latents=int(d.get("n_latents") or 0), model=d.get("model", ""),
                   seed=int(d.get("seed") or 0), fraction=float(d.get("fraction") or 0.2),
                   sample=d.get("sample") or [])


def _num(x: float) -> str:
    return f"{x:.2f}".replace("-", "−")


def control_sample(records: Sequence[FeatureRecord], descriptions: dict[Key, str], scored: set[Key],
                   fraction: float, minimum: int, seed: int) -> list[FeatureRecord]:
    """A seeded sample of the latents that have a description and a matched score: `fraction` of
    them, at least `minimum`, all if fewer; in records' order."""
    candidates = [r for r in records if (descriptions.get(r.key) or "").strip() and r.key in scored]
    k = min(len(candidates), max(minimum, math.ceil(fraction * len(candidates))))
    chosen = set(r.key for r in random.Random(f"control:{seed}").sample(candidates, k))
    return [r for r in candidates if r.key in chosen]


def control_value(s: Scores, method: str, metric: str) -> float | None:
    if metric == "auc":
        return (s.auc or {}).get(method)
    return getattr(s, method)


def compare_control(matched: dict[Key, Scores], shuffled: dict[Key, Scores], methods: Sequence[str],
                    model: str, seed: int, n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """Per method: mean matched, mean shuffled, gap and its paired bootstrap 95% interval over
    latents, a verdict in words. detection/fuzzing compare AUC where every latent has one on both
    sides, else balanced accuracy; simulation compares the correlation."""
    out = {}
    keys = [k for k in shuffled if k in matched]
    for method in methods:
        metric = "pearson" if method == "simulation" else "balanced accuracy"
        if method != "simulation" and keys and all(control_value(matched[k], method, "auc") is not None
                                                   and control_value(shuffled[k], method, "auc") is not None
                                                   for k in keys):
            metric = "auc"
        pairs = [(control_value(matched[k], method, metric), control_value(shuffled[k], method, metric)) for k in keys]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        entry: dict[str, Any] = {"metric": metric, "n": len(pairs)}
        if len(pairs) < 2:
            entry |= {"matched": None, "shuffled": None, "gap": None, "ci95": None, "signal": False,
                      "verdict": f"{method}: too few latents scored both ways ({len(pairs)}) to compare"}
            out[method] = entry
            continue
        a = np.array([p[0] for p in pairs])
        b = np.array([p[1] for p in pairs])
        gaps = list(a - b)
        ci = bootstrap_ci([gaps], lambda g: float(np.mean(g)), n_boot, f"control:{seed}:{method}")
        gap = float(np.mean(gaps))
        # a percentile bootstrap over a handful of latents is too narrow to trust: no verdict of signal
        signal = ci[0] > 0 and len(pairs) >= MIN_CONTROL_PAIRS
        span = f"gap {_num(gap)}, 95% CI {_num(ci[0])}–{_num(ci[1])}"
        if len(pairs) < MIN_CONTROL_PAIRS:
            verdict = (f"{method}: {len(pairs)} latents are too few for a verdict ({span}; at least "
                       f"{MIN_CONTROL_PAIRS} needed): treat it as noise")
        elif signal:
            verdict = f"{method} discriminates ({span})"
        elif ci[1] < 0:
            verdict = (f"{method} from {model} scores shuffled descriptions higher than matched ones ({span}): "
                       "treat it as noise")
        else:
            verdict = f"{method} from {model} does not beat shuffled descriptions ({span}): treat it as noise"
        entry |= {"matched": round(float(a.mean()), 4), "shuffled": round(float(b.mean()), 4),
                  "gap": round(gap, 4), "ci95": ci, "signal": bool(signal), "verdict": verdict}
        out[method] = entry
    return out


def control_plan(records: Sequence[FeatureRecord], descriptions: dict[Key, str], scores: Sequence[Scores],
                 fraction: float = 0.2, minimum: int = 10, seed: int = 0
                 ) -> tuple[list[FeatureRecord], dict[Key, str], dict[Key, Key]]:
    """(sample, shuffled descriptions, where each came from): the control's seeded sample of the
    latents with a description and a matched score, and a seeded derangement of their descriptions
    (avoiding equal texts where possible). Empty descriptions when fewer than 2 latents."""
    scored = {s.key for s in scores if any(getattr(s, m) is not None for m in METHODS)}
    sample = control_sample(records, descriptions, scored, fraction, minimum, seed)
    if len(sample) < 2:
        return sample, {}, {}
    texts = [descriptions[r.key].strip() for r in sample]
    perm = shuffled_assignment(texts, random.Random(f"derangement:{seed}"))
    shuffled = {r.key: descriptions[sample[p].key] for r, p in zip(sample, perm)}
    origin = {r.key: sample[p].key for r, p in zip(sample, perm)}
    return sample, shuffled, origin


def run_control(records: Sequence[FeatureRecord], descriptions: dict[Key, str], scores: Sequence[Scores],
                client, out_path: str | Path | None, settings: ScoreSettings | None = None,
                fraction: float = 0.2, minimum: int = 10, seed: int = 0,
                on_done: Callable[[Scores], None] | None = None) -> ControlResult:
    """Score a seeded sample of the latents again, each with another sampled latent's description
    (a seeded derangement; where two latents share a description text the shuffle avoids handing
    it back), with the same examples as the matched scores; the shuffled scores go to out_path
    (never the matched scores' file) and are resumable. Returns the comparison per method."""
    settings = settings or ScoreSettings()
    matched = {s.key: s for s in scores if any(getattr(s, m) is not None for m in METHODS)}
    sample, shuffled, origin = control_plan(records, descriptions, scores, fraction, minimum, seed)
    model = next((s.simulator.get("model") for s in matched.values() if (s.simulator or {}).get("model")),
                 getattr(client, "model", "") or "")
    base = ControlResult(methods={}, n_latents=len(sample), model=model, seed=seed, fraction=fraction,
                         sample=[list(r.key) for r in sample])
    if len(sample) < 2:
        base.methods = {m: {"metric": None, "n": len(sample), "matched": None, "shuffled": None, "gap": None,
                            "ci95": None, "signal": False,
                            "verdict": f"{m}: too few scored latents ({len(sample)}) for a control"}
                        for m in settings.methods}
        return base
    control_scores = score_records(sample, shuffled, client, out_path, settings, on_done, pool=records, origin=origin)
    base.methods = compare_control(matched, {s.key: s for s in control_scores}, settings.methods, model, seed)
    return base


def print_control(control: ControlResult, console: Console) -> None:
    """The control's verdict per method, as the CLI and label print it."""
    console.print(f"control: {control.n_latents} latents scored again with another latent's description "
                  f"(seed {control.seed})")
    for method, m in control.methods.items():
        if m.get("gap") is None:
            console.print(f"  {m['verdict']}")
            continue
        style = "green" if m["signal"] else "yellow"
        console.print(f"  [{style}]{m['verdict']}[/]  [dim]{m['metric']}: matched {m['matched']:.3f}, "
                      f"shuffled {m['shuffled']:.3f}, n {m['n']}[/]", highlight=False)
    style = "bold yellow" if control.noise else "bold green"
    console.print(f"[{style}]verdict: {control.verdict}[/]", highlight=False)


# ---- the `score` command -------------------------------------------------------------------------

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


HELP_COUNTS = ("Defaults by engine: vllm 50 activating + 50 non-activating (delphi's), simulation from "
               "prompt logprobs; llama-cpp / other 10 + 10 (the most that keeps `make demo` within its time), "
               "simulation from a JSON answer.")


@renamed({"--base-url": "--server"}, refused={"--model": "--llm"})
def cli(
    target: Path = typer.Argument(..., help="A records.jsonl file, or a run directory (every step-N/records.jsonl); "
                                            "explanations.jsonl is read from beside each records file."),
    server: str = typer.Option(None, "--server", metavar="URL", help="OpenAI-compatible server, e.g. "
                               "http://127.0.0.1:8080/v1; without it the embedded llama.cpp server is started and stopped."),
    llm: str = typer.Option(None, "--llm", metavar="NAME", help="Model name at --server (default: the first the "
                                                                "server lists); a GGUF path for the embedded server."),
    engine: str = typer.Option(None, help="Embedded server engine (llama-cpp or vllm), or what the server at "
                                          "--server is: it picks the example counts and the simulation mode."),
    threads: int = typer.Option(None, help="CPU threads of the embedded llama.cpp server."),
    n_ctx: int = typer.Option(2048, "--n-ctx", help="The embedded server's context window in tokens."),
    concurrency: int = typer.Option(4, help="Requests in flight at once."),
    features: int = typer.Option(None, help="Only N features of each checkpoint: the same seeded sample of live "
                                            "ones as `autointerp label --features N`."),
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
    seed: int = typer.Option(0, help="Seed of the example draws, bootstrap intervals and the control."),
    stats_only: bool = typer.Option(False, "--stats-only", help="No server: write labels.jsonl for every latent "
                                                                "from the statistical model alone."),
    timeout: float = typer.Option(300.0, help="Seconds per request before it is retried."),
    retries: int = typer.Option(4, help="Retries per request on timeouts, 429, 5xx, connection errors."),
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
    if stats_only and not features:  # every latent, streamed (a whole SAE does not fit in memory as objects)
        from autointerp.labels.statlabels import write_stat_labels

        for t in targets:
            started = time.perf_counter()
            n = write_stat_labels(t.records_path, t.folder / "labels.jsonl")
            seconds = time.perf_counter() - started
            console.print(f"{t.folder / 'labels.jsonl'}: {n} statistical labels "
                          f"({n / max(seconds, 1e-9):,.1f} features/s)")
        return
    work = []
    for t in targets:
        records = read_records(t.records_path)
        if features:  # the latents `label` described (its stratified sample), else the plain seeded sample
            labelled = set(sampling.labelled_sample(t.folder / "labels.jsonl"))
            records = [r for r in records if r.key in labelled] if labelled else sampling.sample_live(records, features)
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
    with endpoint(server, llm, engine, threads, n_ctx) as (url, model_name, engine_name, check_alive):
        client = LLMClient(url, model_name, cache_path=run_dir / "cache.sqlite", concurrency=concurrency,
                           timeout=timeout, max_retries=retries, check_alive=check_alive, seed=seed)
        all_records, all_descriptions, all_scores, control = [], {}, [], None
        try:
            for t, records, descriptions in work:
                out = t.folder / "scores.jsonl"
                with _progress(console) as progress:
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
                with _progress(console) as progress:
                    task = progress.add_task("control (shuffled descriptions)", total=len(planned))
                    control = run_control(all_records, all_descriptions, all_scores, client, control_path, settings,
                                          control_fraction, control_min, seed,
                                          on_done=lambda _: progress.update(task, advance=1))
                print_control(control, console)
        finally:
            stats = client.stats.to_dict()
            client.close()
            info = {"model": model_name, "engine": engine_name, "base_url": url, "settings": settings.to_dict(),
                    "prompt_sha256": {n: prompt_sha256(n) for n in TEMPLATES.values()},
                    "llm_stats": stats, "seconds": round(time.perf_counter() - started, 2)}
            if control is not None:
                info["control"] = control.to_dict()
                info["control_file"] = str(control_path)
            run_lib.update_manifest(run_dir, "score", info)
    console.print(f"done: {stats['requests']} requests, {stats['cache_hits']} cache hits in "
                  f"{time.perf_counter() - started:.1f} s; `autointerp label {target}` rebuilds the labels")


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


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)
