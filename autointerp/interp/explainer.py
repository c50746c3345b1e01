"""The explainer: one LLM request per latent -> a one-line description of what it fires on.

The request is delphi's (EleutherAI): a few worked examples of highlighted snippets
(`…the<< dog>> barked…`) each followed by one `Explanation:` line, then the latent's own
snippets, ending `Explanation:`; the model writes the next line. The worked examples live in
prompts/explain.txt and hold no class definitions or instructions a small model could copy into
its answer. The snippets come from across the latent's activation range (its strongest contexts
and lower quantiles) among the contexts the explainer may see; the simulator's held-out contexts
stay unseen (scorers.examples.split_contexts).

Two request forms (`ExplainSettings.form`): "completion" (plain /completions, stop at the end of
the line: the form a few-shot prompt is written for) and "chat" (the same text as one user
message, answered as JSON with one string field: for servers that only have chat).

The granularity is not the explainer's: the calibrated decision (granularity.decide) gives it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from autointerp.display import shown
from autointerp.interp.scorers.examples import split_contexts
from autointerp.labels.language import clean_token, max_token
from autointerp.llm.client import LLMAnswerError, LLMClient, estimate_tokens, stream_results
from autointerp.llm.prompts import prompt_sha256, render
from autointerp.jsonl import read_finished
from autointerp.schema import Context, Explanation, FeatureRecord, Key

TEMPLATE = "explain"
FORMS = ("completion", "chat")
ANSWER_SCHEMA: dict[str, Any] = {  # the chat form's answer: one field, nothing to copy
    "type": "object",
    "properties": {"explanation": {"type": "string", "minLength": 1, "maxLength": 200}},
    "required": ["explanation"],
    "additionalProperties": False,
}
MARK_LEVEL = 3  # tokens at >= 30% of the latent's max are highlighted (delphi's threshold: 0.3)
MAX_CHARS = 160  # a description longer than this is cut at a word boundary
# Tried in order until the prompt fits the context window: (contexts, tokens before the max).
TRIM_STEPS = ((12, 8), (10, 6), (8, 5), (6, 4), (4, 3), (2, 2))
CHAT_OVERHEAD_TOKENS = 48  # the chat template's role markers around the prompt


# ---- the prompt ----------------------------------------------------------------------------------

def snippet(context: Context, before: int, after: int = 0, mark_level: int = MARK_LEVEL) -> str:
    """The tokens around the max-activating one (`before` tokens before it, `after` after it),
    runs of active tokens between << >>."""
    center = context.max_index
    if center < 0:
        return ""
    lo, hi = max(0, center - before), min(len(context.tokens), center + after + 1)
    out, open_mark = [], False
    for i in range(lo, hi):
        active = context.levels[i] >= mark_level or i == center
        if active and not open_mark:
            out.append("<<")
        elif not active and open_mark:
            out.append(">>")
        open_mark = active
        out.append(shown(context.tokens[i], "prompt", escape_markers=True))  # our markers stay ours
    if open_mark:
        out.append(">>")
    return "".join(out).strip()


def explainer_contexts(record: FeatureRecord) -> list[Context]:
    """The contexts the explainer may see that fire; the simulator scores on the others (held out)."""
    return [c for c in split_contexts(record)[0] if c.max_index >= 0 and c.levels[c.max_index] > 0]


def spread(contexts: list[Context], n: int) -> list[Context]:
    """n contexts across the activation range (contexts come strongest first): half the strongest,
    the rest evenly spaced over the lower quantiles, in rank order."""
    if len(contexts) <= n:
        return list(contexts)
    top = (n + 1) // 2
    rest, k = contexts[top:], n - top
    picks = sorted({round(i * (len(rest) - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
    return contexts[:top] + [rest[i] for i in picks]


def render_explain_prompt(record: FeatureRecord, n_contexts: int = 10, before: int = 6, after: int = 0) -> str:
    """The few-shot prompt for one latent. Its snippets run from the lower quantiles up to the
    strongest contexts, which come last, next to `Explanation:`: SmolLM2-135M named the marked
    token more often so, and with snippets that end at it (after=0), on the demo's token-level
    features (docs/label.md)."""
    chosen = spread(explainer_contexts(record), n_contexts)[::-1]
    return render(TEMPLATE, snippets=[s for c in chosen if (s := snippet(c, before, after))],
                  top_tokens=top_highlighted(record))


def top_highlighted(record: FeatureRecord, n: int = 3) -> str:
    """`"dog", "dogs"`: the most common max tokens of the explainer's contexts, quoted. Given this
    line, SmolLM2-135M named a token-level latent's top token in 24 of 30 demo latents, against 14
    without it (docs/label.md)."""
    counts = Counter(clean_token(t) for t in map(max_token, explainer_contexts(record)) if t)
    return ", ".join(json.dumps(t.strip() or t, ensure_ascii=False) for t, _ in counts.most_common(n))


def trim_steps(n_contexts: int, before: int) -> list[tuple[int, int]]:
    smaller = [(min(n, n_contexts), min(w, before)) for n, w in TRIM_STEPS]
    return list(dict.fromkeys([(n_contexts, before), *smaller]))


@dataclass(frozen=True)
class FittedPrompt:
    """An explainer prompt fitted to the context window, and what it shows."""

    text: str
    contexts: int  # snippets shown (fewer than asked when the latent has fewer, or the prompt was trimmed)
    window: int  # tokens shown before each snippet's max-activating token
    trimmed: bool  # fewer snippets or a narrower window than asked, to fit the budget


async def fit_prompt(record: FeatureRecord, client: LLMClient | None, budget: int, n_contexts: int = 10,
                     before: int = 6, after: int = 0) -> FittedPrompt:
    """The richest rendering (most contexts, widest window) whose token count, by the server's
    tokenizer where it has one, fits `budget`; the smallest one when none does."""
    steps = trim_steps(n_contexts, before)
    available = len(explainer_contexts(record))
    fitted = None
    for i, (n, w) in enumerate(steps):
        prompt = render_explain_prompt(record, n, w, min(after, w))
        fitted = FittedPrompt(prompt, min(n, available), w, trimmed=i > 0)
        if len(prompt.encode("utf-8")) <= budget:  # a byte-level BPE never has more tokens than bytes
            return fitted
        tokens = await client.count_tokens(prompt) if client is not None else estimate_tokens(prompt)
        if tokens <= budget:
            return fitted
    return fitted


# ---- the answer ----------------------------------------------------------------------------------

_LEAD = re.compile(r"^(explanation\s*:\s*)+", re.IGNORECASE)


def clean_answer(text: str) -> str:
    """The description in an answer: its first non-empty line, without a repeated `Explanation:`
    lead, surrounding whitespace, or a dangling snippet marker; long ones cut at a word boundary."""
    line = next((l for l in text.splitlines() if l.strip()), "")
    line = _LEAD.sub("", line.strip()).strip()
    line = re.sub(r"\s+", " ", line).replace("<<", "").replace(">>", "")
    if len(line) > MAX_CHARS:
        line = line[:MAX_CHARS].rsplit(" ", 1)[0] + "…"
    return line.strip()


def answer_problem(description: str, truncated: bool) -> str | None:
    """Why an answer is no description (None when it is one)."""
    if truncated:
        return "description cut short by max_tokens"
    if not description or not re.search(r"\w", description):
        return "empty description"
    return None


# ---- explaining ----------------------------------------------------------------------------------

@dataclass
class ExplainSettings:
    n_contexts: int = 10  # snippets shown per latent (fewer when they do not fit)
    window: int = 6  # tokens shown before the max-activating token
    after: int = 0  # tokens shown after it
    context_window: int = 2048  # the server's n_ctx
    max_tokens: int = 48  # the answer's budget: one line
    engine: str = ""
    form: str = "completion"
    # Greedy few-shot completions can loop ('"number", "number", ...' to max_tokens) on llama.cpp's
    # server, which has no default repeat penalty; llama-cpp-python's server had 1.1 over the
    # answer's last 64 tokens. llama.cpp's penalties count the prompt too, and over 8 or 64 tokens
    # they stopped the answers quoting the prompt's "Most highlighted" tokens (docs/label.md), so
    # the repeat penalty looks at the last 4 tokens only (the prompt's "\nExplanation:", then the
    # answer's own). llama.cpp's DRY sampler ends longer loops: it penalises a token that extends
    # a sequence already seen when that is longer than dry_allowed_length tokens, so quoting a
    # word stays free and the second round of a loop does not. 120 dev features, greedy: 1
    # invalid answer against 18 with neither, quoting 84% against 86%. 0 / 1.0 turn them off.
    dry_multiplier: float = 0.8
    dry_allowed_length: int = 4
    repeat_penalty: float = 1.1
    repeat_last_n: int = 4

    def sampling_extra(self) -> dict[str, Any] | None:
        """llama.cpp's repetition controls for the completion form (that engine only: vLLM's repeat
        penalty counts the whole prompt and it has no DRY), DRY over the whole context with a line
        break as the only sequence breaker (a loop is a run of quoted tokens)."""
        if self.engine != "llama-cpp" or self.form != "completion":
            return None
        extra: dict[str, Any] = {}
        if self.dry_multiplier:
            extra |= {"dry_multiplier": self.dry_multiplier, "dry_allowed_length": self.dry_allowed_length,
                      "dry_penalty_last_n": self.context_window, "dry_sequence_breakers": ["\n"]}
        if self.repeat_penalty != 1.0:
            extra |= {"repeat_penalty": self.repeat_penalty, "repeat_last_n": self.repeat_last_n}
        return extra or None

    @property
    def request_max_tokens(self) -> int:
        """max_tokens sent: the answer's budget, plus the JSON wrapper's tokens in the chat form."""
        return self.max_tokens + 16 if self.form == "chat" else self.max_tokens

    @property
    def prompt_budget(self) -> int:
        return self.context_window - self.max_tokens - CHAT_OVERHEAD_TOKENS


def _failed(record: FeatureRecord, explainer: dict[str, Any], error: str) -> Explanation:
    return Explanation(checkpoint_step=record.checkpoint_step, feature=record.feature, description="",
                       explainer=explainer, error=error, layer=record.key.layer)


async def _ask(client: LLMClient, prompt: str, sha: str, settings: ExplainSettings,
               temperature: float) -> tuple[str, bool]:
    """(description, truncated) from one request in the settings' form."""
    if settings.form == "chat":
        try:
            answer = await client.chat_json([{"role": "user", "content": prompt}], ANSWER_SCHEMA, template_sha=sha,
                                            max_tokens=settings.request_max_tokens, temperature=temperature,
                                            name="explanation")
        except LLMAnswerError as exc:
            return "", "cut short" in str(exc)
        return clean_answer(str(answer.get("explanation", ""))), False
    result = await client.complete(prompt, template_sha=sha, max_tokens=settings.request_max_tokens,
                                   temperature=temperature, stop=["\n"], extra_body=settings.sampling_extra())
    # stopped at the end of the line: complete; cut by max_tokens with a full line of text: cut short
    return clean_answer(result.text), result.truncated and "\n" not in result.text


def explainer_identity(client: LLMClient, settings: ExplainSettings) -> dict[str, Any]:
    """What made a description (kept with it)."""
    sampling = settings.sampling_extra()
    return {"model": client.model, "prompt_sha256": prompt_sha256(TEMPLATE), "engine": settings.engine,
            "form": settings.form, **({"sampling": sampling} if sampling else {})}


async def explain_feature(record: FeatureRecord, client: LLMClient, settings: ExplainSettings) -> Explanation:
    explainer = explainer_identity(client, settings)
    sha = explainer["prompt_sha256"]
    if not explainer_contexts(record):
        return _failed(record, explainer, "no active contexts (dead latent)")
    fitted = await fit_prompt(record, client, settings.prompt_budget, settings.n_contexts, settings.window,
                              settings.after)
    shown = {"contexts": fitted.contexts, "trimmed": fitted.trimmed}
    description, truncated = await _ask(client, fitted.text, sha, settings, 0.0)
    problem = answer_problem(description, truncated)
    if problem is not None:  # one re-ask, sampled (greedy decoding would repeat itself)
        description, truncated = await _ask(client, fitted.text, sha, settings, 0.7)
        if (second := answer_problem(description, truncated)) is not None:
            return replace(_failed(record, explainer, f"{second} (re-asked once; first: {problem})"), **shown)
    return Explanation(checkpoint_step=record.checkpoint_step, feature=record.feature, description=description,
                       explainer=explainer, layer=record.key.layer, **shown)


def load_finished(path: Path) -> dict[Key, Explanation]:
    return read_finished(path, Explanation.from_dict)


# what a description depends on besides the model (the model's name is not known before a server is)
SETUP_FIELDS = ("prompt_sha256", "form", "sampling")


def other_setup(finished: Iterable[Explanation], client: LLMClient, settings: ExplainSettings) -> int:
    """How many finished descriptions another prompt, request form or sampling wrote (a resumed
    run keeps them; the caller says so)."""
    now = explainer_identity(client, settings)
    return sum(any(e.explainer.get(f) != now.get(f) for f in SETUP_FIELDS) for e in finished)


async def explain_records_async(records: list[FeatureRecord], client: LLMClient, out_path: Path | None = None,
                                settings: ExplainSettings | None = None,
                                on_done: Callable[[Explanation], None] | None = None) -> list[Explanation]:
    settings = settings or ExplainSettings()
    done = load_finished(out_path) if out_path else {}
    todo = [r for r in records if r.key not in done]
    await stream_results([explain_feature(r, client, settings) for r in todo], done, out_path, on_done)
    return [done[r.key] for r in records]


def explain_records(records: list[FeatureRecord], client: LLMClient, out_path: str | Path | None = None,
                    settings: ExplainSettings | None = None,
                    on_done: Callable[[Explanation], None] | None = None) -> list[Explanation]:
    """Explain every record (skipping those already in out_path), streaming each answer to out_path.
    A latent without a valid answer after one re-ask gets an empty description with `error`; the
    batch goes on."""
    return client.run(explain_records_async(records, client, Path(out_path) if out_path else None, settings,
                                            on_done))
