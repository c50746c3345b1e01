"""The explainer: its few-shot prompt (no class definitions), trimming, answers, streaming/resume (fake server).

`autointerp label` is tested in tests/test_label.py."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakeserver import FakeServer  # noqa: E402

from autointerp.errors import UserError  # noqa: E402
from autointerp.interp.explainer import (ExplainSettings, clean_answer, explain_records, fit_prompt,  # noqa: E402
                                load_finished, prompt_sha256, render_explain_prompt)
from autointerp.llm.client import LLMClient  # noqa: E402
from autointerp.jsonl import iter_jsonl  # noqa: E402
from autointerp.schema import Context, Explanation, FeatureRecord  # noqa: E402

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def make_record(feature: int, tokens: list[str], max_at: int, step: int = 100) -> FeatureRecord:
    levels = [0] * len(tokens)
    levels[max_at] = 10
    if max_at + 1 < len(tokens):
        levels[max_at + 1] = 3
    return FeatureRecord(model="toy", layer=0, checkpoint_step=step, feature=feature,
                         contexts=[Context(tokens=tokens, levels=levels)] * 3)


def toy_records(n: int = 5) -> list[FeatureRecord]:
    words = [f"w{i}" for i in range(30)]
    return [make_record(f, words[:10] + [f"feat{f}"] + words[11:], 10) for f in range(n)]  # distinct prompts


LLAMA_CPP_FIELDS = {"dry_multiplier", "repeat_penalty", "repeat_last_n"}  # llama.cpp's own request fields


def dev_records(n: int) -> list[FeatureRecord]:
    if not DEV.exists():
        pytest.skip(f"human-labelled dev data not found at {DEV}")
    records = []
    for record in iter_jsonl(DEV, FeatureRecord.from_dict):
        records.append(record)
        if len(records) == n:
            break
    return records


def client_for(server: FakeServer, tmp_path: Path, **kw) -> LLMClient:
    kw.setdefault("backoff", 0.01)
    return LLMClient(server.base_url, "fake-model", cache_path=tmp_path / "cache.sqlite", **kw)


# ---- prompt ----------------------------------------------------------------------------------

CLASS_WORDS = ("concept-synonym", "concept-semantic", "uninterpretable", "granularity", "Classes",
               "same meaning", "cross_lingual", "cross-lingual", "JSON")


def test_prompt_holds_no_class_definition_or_instruction_to_copy():
    """The explainer's prompt is delphi's few-shot form only: worked examples and snippets. A class
    definition in it is what SmolLM2 copied into 22 of 24 demo descriptions (issue 11)."""
    for record in dev_records(20):
        prompt = render_explain_prompt(record)
        for word in CLASS_WORDS:
            assert word not in prompt, word
        assert "token:" not in prompt.lower()  # no "- token: fires on one specific token" line
        assert prompt.rstrip().endswith("Explanation:")
        assert prompt.count("Explanation:") == 4  # three worked examples, then the feature's


def test_prompt_marks_max_token_and_keeps_markers_ours():
    tokens = ["The", " <script>", "a >> b << c", " road", "s"]
    record = make_record(1, tokens, max_at=3)
    prompt = render_explain_prompt(record, before=6, after=1)
    last = prompt.split("Feature 4")[1]
    assert "<< road" in last and ">>" in last  # the max token, highlighted
    assert "a ›› b ‹‹ c" in last  # a token's own << >> cannot open or close a highlight


def test_most_highlighted_line_counts_the_explainers_contexts_only():
    # even ranks (the explainer's half) fire on " dog" 3 times and " cat" once; the held-out odd
    # ranks all fire on " held": it must not show
    tokens_by_rank = [" dog", " held", " dog", " held", " dog", " held", " cat", " held"]
    contexts = [Context(tokens=["a", "b", t, "c"], levels=[0, 0, 10 - rank, 0]) for rank, t in enumerate(tokens_by_rank)]
    record = FeatureRecord(model="toy", layer=0, checkpoint_step=1, feature=0, contexts=contexts)
    line = render_explain_prompt(record).split("Feature 4")[1].split("Most highlighted:")[1].splitlines()[0]
    assert line.strip() == '"dog", "cat"'


def test_snippets_span_the_activation_range_strongest_last():
    words = [f"w{i}" for i in range(12)]
    contexts = []
    for rank in range(40):  # strongest first, as records store them
        levels = [0] * 12
        levels[5] = max(1, 10 - rank // 4)
        contexts.append(Context(tokens=words[:5] + [f"rank{rank}"] + words[6:], levels=levels))
    record = FeatureRecord(model="toy", layer=0, checkpoint_step=1, feature=0, contexts=contexts)
    last = render_explain_prompt(record, n_contexts=6).split("Feature 4")[1].split("Most highlighted:")[0]
    shown = [int(x) for x in __import__("re").findall(r"rank(\d+)", last)]
    assert len(shown) == 6 and shown[-1] == 0  # the strongest is next to `Explanation:`
    assert max(shown) >= 30  # and lower quantiles are shown too, not only the top 6
    assert all(r % 2 == 0 for r in shown)  # only the explainer's (even-ranked) contexts: odd ones are held out


def test_fit_prompt_trims_to_budget(tmp_path):
    record = toy_records(1)[0]
    record.contexts = record.contexts * 10
    full = render_explain_prompt(record, 12, 8)
    with FakeServer() as server:  # counts len(bytes)/4 tokens
        client = client_for(server, tmp_path)
        budget = len(full.encode()) // 4 - 10
        fitted = asyncio.run(fit_prompt(record, client, budget, 12, 8))
        assert len(fitted.text.encode()) // 4 <= budget < len(full.encode()) // 4
        assert fitted.text.count("<<") < full.count("<<") and fitted.trimmed
        assert fitted.contexts < 12 or fitted.window < 8
        roomy = asyncio.run(fit_prompt(record, client, 100_000, 12, 8))
    assert roomy.text == full and not roomy.trimmed and (roomy.contexts, roomy.window) == (12, 8)


def test_prompt_sha_changes_with_template():
    sha = prompt_sha256("explain")
    assert len(sha) == 64 and sha == prompt_sha256("explain")
    with pytest.raises(UserError, match="not found"):
        prompt_sha256("no-such-template")


@pytest.mark.parametrize("raw,expected", [
    (" the word \"dog\"\nFeature 5", 'the word "dog"'),
    ("Explanation: Explanation:  colours", "colours"),
    ("\n\n  <<雨>> (rain)", "雨 (rain)"),
])
def test_clean_answer_takes_the_first_line(raw, expected):
    assert clean_answer(raw) == expected


# ---- explain_records -----------------------------------------------------------------------------

def test_explanations_written_and_rerun_is_request_free(tmp_path):
    records = dev_records(3)
    out = tmp_path / "explanations.jsonl"
    with FakeServer() as server:
        explanations = explain_records(records, client_for(server, tmp_path), out, ExplainSettings(engine="fake"))
        first = len(server.bodies)
        out.unlink()  # even with the file gone, the cache answers
        client = client_for(server, tmp_path)
        again = explain_records(records, client, out, ExplainSettings(engine="fake"))
    assert first == 3 and len(server.bodies) == 3 and client.stats.cache_hits == 3
    assert [e.to_dict() for e in again] == [e.to_dict() for e in explanations]
    for e in load_finished(out).values():
        assert e.description == "Paris." and e.error is None and e.granularity is None
        assert e.explainer == {"model": "fake-model", "prompt_sha256": prompt_sha256("explain"), "engine": "fake",
                               "form": "completion"}
    assert all(b["stop"] == ["\n"] and b["prompt"].rstrip().endswith("Explanation:") for b in server.bodies)
    assert all(not set(b) & LLAMA_CPP_FIELDS for b in server.bodies)


def test_chat_form_bad_answer_is_reasked_then_failed_and_batch_goes_on(tmp_path):
    records = toy_records(3)

    def answer(request):  # feature 0 (max token "feat0") always gets an empty description
        return json.dumps({"explanation": " " if "feat0" in request["messages"][0]["content"] else "the word feat"})

    with FakeServer(answer=answer) as server:
        explanations = explain_records(records, client_for(server, tmp_path), tmp_path / "e.jsonl",
                                       ExplainSettings(form="chat"))
    failed = [e for e in explanations if e.error]
    assert len(failed) == 1 and failed[0].feature == 0 and "re-asked once" in failed[0].error
    assert failed[0].description == ""
    assert server.requests == 4  # one re-ask, for feature 0 only
    assert [e.description for e in explanations if not e.error] == ["the word feat"] * 2
    assert len(load_finished(tmp_path / "e.jsonl")) == 3


def test_dead_latent_sends_no_request(tmp_path):
    dead = FeatureRecord(model="toy", layer=0, checkpoint_step=1, feature=9,
                         contexts=[Context(tokens=["a", "b"], levels=[0, 0])])
    with FakeServer() as server:
        [e] = explain_records([dead], client_for(server, tmp_path), tmp_path / "e.jsonl")
    assert len(server.bodies) == 0 and e.description == "" and "dead" in e.error


def test_server_going_down_loses_nothing_and_rerun_resumes(tmp_path):
    records = toy_records(6)
    out = tmp_path / "e.jsonl"
    chat = ExplainSettings(form="chat")
    answer = lambda request: json.dumps({"explanation": "the word feat"})  # noqa: E731
    with FakeServer(down_after=2, answer=answer) as server:
        client = client_for(server, tmp_path, concurrency=1, max_retries=1)
        with pytest.raises(UserError, match="failed after 2 attempts"):
            explain_records(records, client, out, chat)
    assert len(load_finished(out)) == 2
    with FakeServer(answer=answer) as server:
        explain_records(records, client_for(server, tmp_path), out, chat)
    assert server.requests == 4  # only the features not yet done
    features = [json.loads(l)["feature"] for l in out.read_text().splitlines()]
    assert sorted(features) == list(range(6))


def test_partial_last_line_is_dropped_on_resume(tmp_path):
    out = tmp_path / "e.jsonl"
    good = Explanation(100, 0, "d")
    out.write_text(json.dumps(good.to_dict()) + "\n" + '{"checkpoint_step": 100, "feat')
    done = load_finished(out)
    assert list(done) == [(100, None, 0)]
    assert out.read_text().endswith("\n") and len(out.read_text().splitlines()) == 1


def test_old_explanation_lines_still_read():
    old = {"checkpoint_step": 1, "feature": 2, "description": "x", "granularity": "token", "cross_lingual": True,
           "confidence": 0.7, "explainer": {"model": "m"}, "error": None}
    e = Explanation.from_dict(old)
    assert (e.granularity, e.cross_lingual, e.confidence, e.explainer) == ("token", True, 0.7, {"model": "m"})


def test_repetition_controls_go_to_llama_cpp_completions_only(tmp_path):
    """llama.cpp counts the prompt in its penalties: its repeat window is the last 4 tokens and DRY
    breaks sequences at line ends only; the record names them. Another engine, or the chat form,
    gets none of llama.cpp's fields."""
    records = dev_records(2)
    bodies, records_out = {}, {}
    for engine, form in (("llama-cpp", "completion"), ("vllm", "completion"), ("llama-cpp", "chat")):
        with FakeServer() as server:
            out = tmp_path / f"{engine}-{form}.jsonl"
            explain_records(records, client_for(server, tmp_path / f"{engine}-{form}"), out,
                            ExplainSettings(engine=engine, form=form))
            bodies[engine, form], records_out[engine, form] = server.bodies, list(load_finished(out).values())
    sent = bodies["llama-cpp", "completion"]
    assert sent and all(b["repeat_last_n"] == 4 and b["repeat_penalty"] == 1.1 and b["dry_multiplier"] == 0.8
                        and b["dry_sequence_breakers"] == ["\n"] and b["dry_penalty_last_n"] == 2048 for b in sent)
    assert all(e.explainer["sampling"]["dry_allowed_length"] == 4 for e in records_out["llama-cpp", "completion"])
    for key in (("vllm", "completion"), ("llama-cpp", "chat")):
        assert bodies[key] and all(not set(b) & LLAMA_CPP_FIELDS for b in bodies[key])
        assert all("sampling" not in e.explainer for e in records_out[key])
    assert ExplainSettings(engine="llama-cpp", dry_multiplier=0, repeat_penalty=1.0).sampling_extra() is None
