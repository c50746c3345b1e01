"""delphi's classifier scorers: the simulator reads a description and says, for each of a few
examples at a time, whether the latent fires there.

- detection: the windows shuffled, 5 per prompt; the simulator answers a list of 0/1
  ("[1,0,0,1,0]", a JSON-schema array). Score: balanced accuracy; AUC from P("1") at each answer
  position where the server returns logprobs.
- fuzzing: the activating windows with their active tokens marked <<like this>>, the
  non-activating ones with as many tokens marked; the simulator says which markings fit.

Intervals (`MethodResult.ci95`): a seeded bootstrap with the items resampled within each class.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from autointerp.interp.scorers.base import MethodResult, Scorer
from autointerp.interp.scorers.examples import ExamplePlan, shown_text
from autointerp.interp.scorers.metrics import auc, balanced_accuracy, bootstrap_ci
from autointerp.interp.scorers.settings import ScoreSettings
from autointerp.llm.client import json_response_format
from autointerp.llm.prompts import prompt_sha256, render

_ROLE_LINE = re.compile(r"^=== (system|user|assistant) ===$", re.M)


def chat_messages(text: str) -> list[dict[str, str]]:
    """A rendered template with `=== role ===` lines -> chat messages (few-shot turns)."""
    parts = _ROLE_LINE.split(text)
    if len(parts) < 3:
        return [{"role": "user", "content": text.strip()}]
    return [{"role": role, "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


@dataclass
class Item:
    text: str
    activating: bool
    kind: str


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


class Classifier(Scorer):
    """delphi's classifier: the items shuffled, per_prompt a prompt of `template`, a 0/1 list per
    prompt. Subclasses say which items the simulator is shown."""

    template: str

    @property
    def templates(self) -> tuple[str, ...]:
        return (self.template,)

    @abstractmethod
    def items(self, plan: ExamplePlan, settings: ScoreSettings, rng: random.Random) -> list[Item]:
        """The examples, each with whether the latent fires there."""

    async def score(self, client, description: str, plan: ExamplePlan, settings: ScoreSettings,
                    rng: random.Random) -> MethodResult:
        template = self.template
        items = self.items(plan, settings, rng)
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


class Detection(Classifier):
    name = "detection"
    template = "detect"

    def items(self, plan: ExamplePlan, settings: ScoreSettings, rng: random.Random) -> list[Item]:
        return detection_items(plan)


class Fuzzing(Classifier):
    name = "fuzzing"
    template = "fuzz"

    def items(self, plan: ExamplePlan, settings: ScoreSettings, rng: random.Random) -> list[Item]:
        return fuzzing_items(plan, settings, rng)
