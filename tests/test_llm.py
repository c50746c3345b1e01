"""LLMClient against the fault-injecting fake server: retries, repair, cache, errors."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakeserver import GOOD_ANSWER, FakeServer, completion  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

from autointerp.errors import UserError  # noqa: E402
from autointerp.llm.client import (LLMAnswerError, LLMClient, TokenLogprob, result_from_response,  # noqa: E402
                            cache_key, estimate_tokens, parse_json_answer, read_logprobs, server_root, validate)

SCHEMA = {"type": "object", "required": ["description", "granularity", "cross_lingual", "confidence"],
          "properties": {"description": {"type": "string"},
                         "granularity": {"type": "string", "enum": ["token", "concept-synonym",
                                                                    "concept-semantic", "uninterpretable"]},
                         "cross_lingual": {"type": "boolean"}, "confidence": {"type": "number"}}}
MESSAGES = [{"role": "user", "content": "label this feature"}]


def client_for(server: FakeServer, tmp_path: Path | None = None, **kw) -> LLMClient:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return LLMClient(server.base_url, "fake-model", cache_path=tmp_path / "cache.sqlite" if tmp_path else None, **kw)


def test_retries_500_and_429_then_answers():
    with FakeServer(faults=["500", "429", "503"]) as server:
        client = client_for(server)
        result = asyncio.run(client.chat(MESSAGES))
    assert json.loads(result.text) == GOOD_ANSWER
    assert server.requests == 4
    assert client.stats.retries == 3 and client.stats.requests == 1 and client.stats.errors == 3


def test_garbage_http_body_is_retried():
    with FakeServer(faults=["garbage_body"]) as server:
        client = client_for(server)
        result = asyncio.run(client.chat(MESSAGES))
    assert json.loads(result.text)["granularity"] == "token"
    assert server.requests == 2


def test_hang_times_out_and_is_retried():
    # the timeout leaves the good answer room on a busy machine (0.5 s once retried it too)
    with FakeServer(faults=["hang"], hang_seconds=6.0) as server:
        client = client_for(server, timeout=2.0)
        started = time.perf_counter()
        result = asyncio.run(client.chat(MESSAGES))
        elapsed = time.perf_counter() - started
    assert json.loads(result.text) == GOOD_ANSWER
    assert client.stats.retries == 1 and server.requests == 2
    assert elapsed < 5.0  # did not wait for the hung answer


def test_4xx_is_not_retried():
    with FakeServer(faults=["400"]) as server:
        client = client_for(server)
        with pytest.raises(UserError, match="HTTP 400"):
            asyncio.run(client.chat(MESSAGES))
    assert server.requests == 1


def test_server_down_gives_one_line_error_naming_url():
    with FakeServer() as server:  # take a free port, then close it
        url = server.base_url
    client = LLMClient(url, "m", max_retries=2, backoff=0.01, timeout=2)
    with pytest.raises(UserError) as info:
        asyncio.run(client.chat(MESSAGES))
    message = str(info.value)
    assert url in message and "3 attempts" in message and "\n" not in message
    assert client.stats.errors == 3


def test_repair_reask_after_garbage_answer():
    with FakeServer(faults=["garbage"]) as server:
        client = client_for(server)
        answer = asyncio.run(client.chat_json(MESSAGES, SCHEMA))
    assert answer == GOOD_ANSWER
    assert server.requests == 2 and client.stats.repairs == 1
    repair = server.bodies[1]["messages"]
    assert repair[1]["role"] == "assistant" and "roads" in repair[1]["content"]
    assert "not JSON" in repair[2]["content"]
    assert server.bodies[0]["response_format"]["type"] == "json_schema"
    assert server.bodies[0]["response_format"]["json_schema"]["schema"] == SCHEMA


def test_invalid_after_repair_raises_answer_error():
    with FakeServer(faults=["bad_enum", "garbage"]) as server:
        client = client_for(server)
        with pytest.raises(LLMAnswerError, match="not JSON") as info:
            asyncio.run(client.chat_json(MESSAGES, SCHEMA))
    assert "banana" in str(info.value)  # the first problem is kept too
    assert server.requests == 2


def test_cache_makes_second_run_request_free(tmp_path):
    with FakeServer() as server:
        first = client_for(server, tmp_path)
        asyncio.run(first.chat_json(MESSAGES, SCHEMA, template_sha="abc"))
        first.close()
        second = client_for(server, tmp_path)
        answer = asyncio.run(second.chat_json(MESSAGES, SCHEMA, template_sha="abc"))
        assert server.requests == 1
        assert second.stats.requests == 0 and second.stats.cache_hits == 1 and answer == GOOD_ANSWER
        # a changed template is a different request
        asyncio.run(second.chat_json(MESSAGES, SCHEMA, template_sha="def"))
        assert server.requests == 2


def test_cache_key_covers_model_template_and_request():
    base = cache_key("m", "t", {"messages": MESSAGES})
    assert base != cache_key("m2", "t", {"messages": MESSAGES})
    assert base != cache_key("m", "t2", {"messages": MESSAGES})
    assert base != cache_key("m", "t", {"messages": MESSAGES, "max_tokens": 5})
    assert base == cache_key("m", "t", {"messages": [dict(m) for m in MESSAGES]})


def test_logprobs_are_returned_and_cached(tmp_path):
    with FakeServer() as server:
        client = client_for(server, tmp_path)
        fresh = asyncio.run(client.chat(MESSAGES, logprobs=True, top_logprobs=3))
        again = asyncio.run(client.chat(MESSAGES, logprobs=True, top_logprobs=3))
    assert server.bodies[0]["top_logprobs"] == 3 and server.bodies[0]["logprobs"] is True
    assert len(fresh.logprobs) > 0 and len(fresh.logprobs[0].top) == 3
    assert again.cached and again.logprobs == fresh.logprobs and server.requests == 1


def test_concurrency_is_bounded():
    with FakeServer(delay=0.3) as server:
        client = client_for(server, concurrency=2)

        async def many():
            await asyncio.gather(*[client.chat([{"role": "user", "content": str(i)}]) for i in range(6)])

        asyncio.run(many())
    assert server.requests == 6 and server.max_in_flight == 2


def test_client_survives_several_event_loops():
    with FakeServer() as server:
        client = client_for(server)
        for i in range(2):
            asyncio.run(client.chat([{"role": "user", "content": f"loop {i}"}]))
    assert client.stats.requests == 2


def test_count_tokens_uses_server_then_estimate(tmp_path):
    text = "hello world 日本語"
    with FakeServer() as server:
        client = client_for(server, tmp_path)
        assert asyncio.run(client.count_tokens(text)) == len(text.encode()) // 4
    with FakeServer(tokenize=False) as server:
        client = client_for(server)
        assert asyncio.run(client.count_tokens(text)) == estimate_tokens(text)


def test_validate_and_parse():
    assert validate(GOOD_ANSWER, SCHEMA) == []
    assert validate({k: v for k, v in GOOD_ANSWER.items() if k != "confidence"}, SCHEMA) == \
        ["missing key 'confidence'"]
    assert validate({**GOOD_ANSWER, "confidence": None}, SCHEMA) == ["'confidence' must be a number, got null"]
    assert validate({**GOOD_ANSWER, "cross_lingual": "yes"}, SCHEMA)
    assert validate({**GOOD_ANSWER, "confidence": True}, SCHEMA)
    assert validate([1], SCHEMA) == ["expected a JSON object, got list"]
    assert parse_json_answer('```json\n{"a": 1}\n```') == {"a": 1}
    with pytest.raises(json.JSONDecodeError):
        parse_json_answer("no json here")
    assert server_root("http://h:1/v1/") == "http://h:1"


def test_bad_concurrency_is_user_error():
    with pytest.raises(UserError, match="concurrency"):
        LLMClient("http://127.0.0.1:1/v1", "m", concurrency=0)


def test_json_answer_cut_short_by_max_tokens_is_not_valid():
    # the text parses, but finish_reason "length" says max_tokens cut it: re-asked, then an error
    with FakeServer(faults=["truncated", "truncated"]) as server:
        client = client_for(server)
        with pytest.raises(LLMAnswerError, match=r"cut short by max_tokens \(40\)"):
            asyncio.run(client.chat_json(MESSAGES, SCHEMA, max_tokens=40))
    assert server.requests == 2 and client.stats.truncated == 2 and client.stats.repairs == 1
    assert "cut short" in server.bodies[1]["messages"][-1]["content"]
    with FakeServer(faults=["truncated"]) as server:  # the re-ask's complete answer is taken
        client = client_for(server)
        assert asyncio.run(client.chat_json(MESSAGES, SCHEMA)) == GOOD_ANSWER
    assert client.stats.truncated == 1 and server.requests == 2


def test_truncation_survives_the_cache(tmp_path):
    with FakeServer(faults=["truncated"]) as server:
        first = client_for(server, tmp_path)
        cut = asyncio.run(first.chat(MESSAGES))
        first.close()
        again = asyncio.run(client_for(server, tmp_path).chat(MESSAGES))
    assert cut.truncated and again.cached and again.truncated and server.requests == 1


def test_completions_endpoint_reads_completions_form_logprobs(tmp_path):
    with FakeServer() as server:
        client = client_for(server, tmp_path)
        result = asyncio.run(client.complete("The capital of France is", max_tokens=4, logprobs=2, stop=["\n"]))
        again = asyncio.run(client.complete("The capital of France is", max_tokens=4, logprobs=2, stop=["\n"]))
    assert server.bodies[0]["prompt"] == "The capital of France is" and server.bodies[0]["logprobs"] == 2
    assert server.bodies[0]["stop"] == ["\n"] and server.bodies[0]["model"] == "fake-model"
    assert result.text == " Paris." and not result.truncated
    assert [t.token for t in result.logprobs] == [" Paris", "."]
    assert result.logprobs[0].logprob == -0.25 and result.logprobs[0].top == {" Paris": -0.25, " London": -4.0}
    assert again.cached and again.logprobs == result.logprobs and len(server.bodies) == 1


def test_read_logprobs_takes_both_forms():
    chat = {"content": [{"token": "7", "logprob": -0.1, "top_logprobs": [{"token": "7", "logprob": -0.1},
                                                                        {"token": "8", "logprob": -2.5}]}]}
    legacy = {"tokens": ["7"], "token_logprobs": [-0.1], "top_logprobs": [{"7": -0.1, "8": -2.5}]}
    assert read_logprobs(chat) == read_logprobs(legacy) == [TokenLogprob("7", -0.1, {"7": -0.1, "8": -2.5})]
    assert read_logprobs(None) is None and read_logprobs({"content": None, "tokens": None}) is None


def test_fenced_chat_answer_keeps_the_text_its_logprob_tokens_spell():
    # llama.cpp strips a ```json fence from the content but not from the logprobs
    tokens = ["```", "json", "\n", '{"a":', " 7", "}", "\n```"]
    body = completion('{"a": 7}', {"model": "m", "logprobs": True})
    body["choices"][0]["logprobs"] = {"content": [{"token": t, "logprob": -0.5, "top_logprobs": []} for t in tokens]}
    result = result_from_response(ChatCompletion.model_validate(body))
    assert result.text == "".join(tokens) and parse_json_answer(result.text) == {"a": 7}
    plain = result_from_response(ChatCompletion.model_validate(completion('{"a": 7}', {"model": "m"})))
    assert plain.text == '{"a": 7}' and plain.logprobs is None


def test_count_tokens_asks_tokenize_once_when_missing():
    with FakeServer(tokenize=False) as server:
        client = client_for(server)
        assert asyncio.run(client.count_tokens("abc")) == estimate_tokens("abc")
        assert asyncio.run(client.count_tokens("abcdef")) == estimate_tokens("abcdef")
    assert client.stats.tokenize_requests == 1  # a 404 is remembered
