"""An async client for OpenAI-compatible servers (llama.cpp, vLLM): bounded concurrency,
retries with backoff, a SQLite response cache, structured JSON answers (OpenAI's
response_format json_schema, which both servers take), logprobs from the chat and the
completions endpoints.

    client = LLMClient("http://127.0.0.1:8080/v1", "smollm2", cache_path="runs/x/cache.sqlite")
    answer = await client.chat_json(messages, EXPLANATION_SCHEMA, template_sha=sha)

The cache is keyed by sha256(model, prompt template sha, full request JSON), so a rerun or a
resumed run sends no request twice. Retries cover timeouts, connection errors, 429 and 5xx;
after the last one the caller gets a UserError naming the URL and the last error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

import httpx
import openai

from autointerp.errors import UserError

T = TypeVar("T")

RETRYABLE = (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
             openai.InternalServerError, openai.APIResponseValidationError)

REPAIR_MESSAGE = ("Your answer was not valid: {error}. Answer again with only one JSON object "
                  "that matches the schema.")


class RequestRejected(UserError):
    """The server refused a request with a 4xx other than 429: retrying the same request will not help."""

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


class LLMAnswerError(Exception):
    """The model's answer failed validation even after one repair re-ask."""

    def __init__(self, message: str, raw: str = ""):
        super().__init__(message)
        self.raw = raw


@dataclass
class TokenLogprob:
    """One generated token with its logprob and the top alternatives (token -> logprob)."""

    token: str
    logprob: float
    top: dict[str, float]


@dataclass
class ChatResult:
    text: str
    logprobs: list[TokenLogprob] | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", or "length" when max_tokens cut the answer short
    # vLLM's prompt_logprobs as sent: per prompt token None or {token id: {logprob, rank, decoded_token}}
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    reduced: Any = None  # what a `reduce` function kept of the answer (JSON), cached in place of prompt_logprobs

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class LLMStats:
    requests: int = 0  # HTTP chat requests answered by the server (cache hits excluded)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0  # failed attempts (each retry counts)
    retries: int = 0
    repairs: int = 0
    truncated: int = 0  # JSON answers cut short by max_tokens (finish_reason "length")
    tokenize_requests: int = 0
    seconds: float = 0.0  # wall time spent waiting on the server

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(model: str, template_sha: str, request: dict[str, Any]) -> str:
    blob = json.dumps({"model": model, "template_sha": template_sha, "request": request},
                      sort_keys=True, ensure_ascii=False)
    return sha256_text(blob)


class ResponseCache:
    """sha256 key -> JSON answer, in SQLite (WAL, one commit per answer so a crash keeps them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                         "created REAL NOT NULL)")
        self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                         (key, json.dumps(value, ensure_ascii=False), time.time()))
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def json_response_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    """response_format asking for JSON matching `schema`, in OpenAI's form, which llama.cpp's server
    and vLLM both take. (llama-cpp-python's server refused it; it is no longer supported.)"""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


_JSON_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list}


def validate(value: Any, schema: dict[str, Any]) -> list[str]:
    """Check an answer against the subset of JSON Schema the prompts use (object, required,
    property types, enum, number ranges). Returns the problems; empty when valid."""
    if not isinstance(value, dict):
        return [f"expected a JSON object, got {type(value).__name__}"]
    problems = [f"missing key {k!r}" for k in schema.get("required", []) if k not in value]
    for key, spec in schema.get("properties", {}).items():
        if key not in value:
            continue
        v, kind = value[key], spec.get("type")
        if kind in _JSON_TYPES and not isinstance(v, _JSON_TYPES[kind]):
            problems.append(f"{key!r} must be a {kind}, got {json.dumps(v, ensure_ascii=False)[:40]}")
            continue
        if kind in ("number", "integer") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                              or (kind == "integer" and not float(v).is_integer())):
            problems.append(f"{key!r} must be a {kind}, got {json.dumps(v, ensure_ascii=False)[:40]}")
            continue
        if "enum" in spec and v not in spec["enum"]:
            problems.append(f"{key!r} must be one of {spec['enum']}, got {json.dumps(v, ensure_ascii=False)[:40]}")
        if "minimum" in spec and isinstance(v, (int, float)) and v < spec["minimum"]:
            problems.append(f"{key!r} must be >= {spec['minimum']}")
        if "maximum" in spec and isinstance(v, (int, float)) and v > spec["maximum"]:
            problems.append(f"{key!r} must be <= {spec['maximum']}")
    return problems


def parse_json_answer(text: str) -> Any:
    """Parse a model's JSON answer, tolerating a ```json fence or text around one object."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start >= 0 and end > start:
            return json.loads(text[start:end + 1])  # raises JSONDecodeError when still broken
        raise


def server_root(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port (non-OpenAI endpoints like /tokenize live there)."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


class LLMClient:
    """Async chat/completions client: bounded concurrency, retries with exponential backoff +
    jitter, SQLite response cache, JSON-schema answers with one repair re-ask."""

    def __init__(self, base_url: str, model: str, cache_path: str | Path | None = None, concurrency: int = 4,
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 0.5, api_key: str = "none",
                 check_alive: Callable[[], None] | None = None, seed: int = 0):
        if concurrency < 1:
            raise UserError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.api_key = api_key
        self.seed = seed
        # Called on a connection failure: raises a clearer UserError when a supervised server died.
        self.check_alive = check_alive
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.stats = LLMStats()
        self._rng = random.Random(seed)
        self._loop_state: tuple[Any, openai.AsyncOpenAI, asyncio.Semaphore] | None = None
        self._can_tokenize: bool | None = None  # False once /tokenize is known to be missing

    # An AsyncOpenAI client and a semaphore belong to one event loop; stages that call
    # asyncio.run() one after another get fresh ones.
    def _state(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop_state is None or self._loop_state[0] is not loop:
            client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                        max_retries=0)  # our own retries, with our own error message
            self._loop_state = (loop, client, asyncio.Semaphore(self.concurrency))
        return self._loop_state[1], self._loop_state[2]

    def _fail(self, what: str, exc: BaseException) -> UserError:
        if self.check_alive is not None:
            self.check_alive()  # raises its own UserError when the server process is gone
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        return UserError(f"{what} {self.base_url} failed after {self.max_retries + 1} attempts ({detail}); "
                         "finished work is saved, run the same command again to resume")

    async def _backoff(self, attempt: int) -> None:
        delay = self.backoff * (2 ** attempt)
        await asyncio.sleep(delay * (0.5 + self._rng.random()))  # jitter: 0.5x .. 1.5x

    async def chat(self, messages: list[dict[str, str]], *, template_sha: str = "",
                   response_format: dict[str, Any] | None = None, max_tokens: int = 256,
                   temperature: float = 0.0, logprobs: bool = False, top_logprobs: int | None = None) -> ChatResult:
        request: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                                   "seed": self.seed}
        if response_format is not None:
            request["response_format"] = response_format
        if logprobs:
            request["logprobs"] = True
            if top_logprobs is not None:
                request["top_logprobs"] = top_logprobs
        return await self._send("chat", request, template_sha)

    async def complete(self, prompt: str, *, template_sha: str = "", max_tokens: int = 64,
                       temperature: float = 0.0, logprobs: int | None = None,
                       stop: list[str] | None = None, extra_body: dict[str, Any] | None = None,
                       reduce: Callable[[ChatResult], Any] | None = None) -> ChatResult:
        """A plain text completion (the /completions endpoint: few-shot prompts, no chat
        template); `logprobs` asks for that many alternatives per generated token; `extra_body`
        carries server extensions, e.g. vLLM's {"prompt_logprobs": N}. `reduce` computes what the
        caller keeps of an answer too big to cache whole (prompt logprobs: N alternatives at every
        prompt token, MBs) into `result.reduced`; that is cached instead of the prompt logprobs, so
        a rerun reads the same value back."""
        request: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                                   "seed": self.seed}
        if logprobs is not None:
            request["logprobs"] = logprobs
        if stop:
            request["stop"] = stop
        if extra_body:
            request["extra_body"] = extra_body
        return await self._send("completions", request, template_sha, reduce)

    async def _send(self, endpoint: str, request: dict[str, Any], template_sha: str,
                    reduce: Callable[[ChatResult], Any] | None = None) -> ChatResult:
        """One request to /chat/completions or /completions: cache, bounded concurrency, retries."""
        keyed: dict[str, Any] = request if endpoint == "chat" else {"completions": request}
        if reduce is not None:  # another reduction of the same answer is another cache entry
            keyed = {**keyed, "reduced_by": f"{reduce.__module__}.{reduce.__qualname__}"}
        key = cache_key(self.model, template_sha, keyed)
        cache = self.cache
        if cache is not None and (hit := cache.get(key)) is not None:
            self.stats.cache_hits += 1
            return result_from_dict(hit, cached=True)

        client, semaphore = self._state()
        create = client.chat.completions.create if endpoint == "chat" else client.completions.create
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            async with semaphore:
                started = time.perf_counter()
                try:
                    response = await create(model=self.model, **request)
                    result = result_from_response(response)
                    if reduce is not None:
                        result.reduced, result.prompt_logprobs = reduce(result), None
                except RETRYABLE as exc:
                    last = exc
                except openai.APIStatusError as exc:  # 4xx other than 429: retrying will not help
                    self.stats.errors += 1
                    raise RequestRejected(f"{self.base_url} refused the request: HTTP {exc.status_code} "
                                          f"{str(exc)[:200]}".replace("\n", " "), exc.status_code) from None
                else:
                    self.stats.requests += 1
                    self.stats.prompt_tokens += result.prompt_tokens
                    self.stats.completion_tokens += result.completion_tokens
                    if cache is not None:
                        cache.put(key, result_to_dict(result))
                    return result
                finally:
                    self.stats.seconds += time.perf_counter() - started
            self.stats.errors += 1
            if isinstance(last, openai.APIConnectionError) and self.check_alive is not None:
                self.check_alive()
            if attempt < self.max_retries:
                self.stats.retries += 1
                await self._backoff(attempt)
        raise self._fail(f"{endpoint} request to", last)

    async def chat_json(self, messages: list[dict[str, str]], schema: dict[str, Any], *, template_sha: str = "",
                        max_tokens: int = 256, temperature: float = 0.0, name: str = "answer") -> dict[str, Any]:
        """Ask for one JSON object matching `schema`; one repair re-ask; else LLMAnswerError. An
        answer cut short by max_tokens is not valid even when what came back parses."""
        response_format = json_response_format(schema, name)
        result = await self.chat(messages, template_sha=template_sha, response_format=response_format,
                                 max_tokens=max_tokens, temperature=temperature)
        value, problem = self._check(result, schema, max_tokens)
        if problem is None:
            return value
        self.stats.repairs += 1
        repair = [*messages, {"role": "assistant", "content": result.text},
                  {"role": "user", "content": REPAIR_MESSAGE.format(error=problem)}]
        second = await self.chat(repair, template_sha=template_sha, response_format=response_format,
                                 max_tokens=max_tokens, temperature=temperature)
        value, problem2 = self._check(second, schema, max_tokens)
        if problem2 is None:
            return value
        raise LLMAnswerError(f"invalid answer after one repair: {problem2} (first: {problem})", raw=second.text)

    def _check(self, result: ChatResult, schema: dict[str, Any], max_tokens: int
               ) -> tuple[dict[str, Any] | None, str | None]:
        value, problem = check_answer(result, schema, max_tokens)
        self.stats.truncated += result.truncated
        return value, problem

    async def count_tokens(self, text: str) -> int:
        """Tokens in `text` by the server's tokenizer (/tokenize: llama.cpp and vLLM both have it);
        a UTF-8 bytes/3 estimate where none answers."""
        key = cache_key(self.model, "tokenize", {"text": text})
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return int(hit["count"])
        count = await self._server_count(text)
        if count is None:
            return estimate_tokens(text)
        if self.cache is not None:
            self.cache.put(key, {"count": count})
        return count

    async def _server_count(self, text: str) -> int | None:
        if self._can_tokenize is False:
            return None
        # llama.cpp reads "content" (no special tokens by default), vLLM "prompt" + "add_special_tokens"
        body = {"model": self.model, "prompt": text, "content": text, "add_special_tokens": False}
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            try:
                response = await http.post(server_root(self.base_url) + "/tokenize", json=body)
                self.stats.tokenize_requests += 1
                data = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                data = None
        count = data.get("count") if isinstance(data, dict) else None
        if count is None and isinstance(data, dict) and isinstance(data.get("tokens"), list):
            count = len(data["tokens"])
        self._can_tokenize = isinstance(count, int)
        return count if isinstance(count, int) else None

    async def aclose(self) -> None:
        """Close this event loop's HTTP connections (call before the loop ends)."""
        if self._loop_state is not None and self._loop_state[0] is asyncio.get_running_loop():
            await self._loop_state[1].close()
            self._loop_state = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """asyncio.run(coro), closing the client's connections inside that loop: the sync entry
        point for stages (explain, score) that each run their own event loop."""
        async def wrapped() -> T:
            try:
                return await coro
            finally:
                await self.aclose()

        return asyncio.run(wrapped())

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def estimate_tokens(text: str) -> int:
    # bytes, not characters: a Japanese character is 3 UTF-8 bytes and often 1-3 BPE tokens.
    return len(text.encode("utf-8")) // 3 + 1


def check_answer(result: ChatResult, schema: dict[str, Any], max_tokens: int | None = None
                 ) -> tuple[dict[str, Any] | None, str | None]:
    """(value, None) for a complete answer that parses and matches `schema`, else (None, problem).
    Cut short by max_tokens (finish_reason "length") is a problem even when the text parses."""
    text = result.text
    if result.truncated:
        limit = f"max_tokens ({max_tokens})" if max_tokens else "max_tokens"
        return None, f"cut short by {limit} before the answer ended: {text[-60:]!r}; answer shorter"
    try:
        value = parse_json_answer(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at char {exc.pos}): {text[:80]!r}"
    problems = validate(value, schema)
    return (value, None) if not problems else (None, "; ".join(problems))


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def read_logprobs(logprobs: Any) -> list[TokenLogprob] | None:
    """Per-token logprobs from a choice's `logprobs`, in either form a server sends:
    the chat form, content[i] = {token, logprob, top_logprobs: [{token, logprob}]} (OpenAI chat,
    vLLM chat, llama.cpp on both endpoints), or the completions form, parallel lists tokens /
    token_logprobs / top_logprobs: [{token: logprob}] (OpenAI and vLLM completions)."""
    if logprobs is None:
        return None
    content = _field(logprobs, "content")
    if content:
        return [TokenLogprob(token=_field(t, "token"), logprob=float(_field(t, "logprob")),
                             top={_field(a, "token"): float(_field(a, "logprob"))
                                  for a in (_field(t, "top_logprobs") or [])})
                for t in content]
    tokens = _field(logprobs, "tokens")
    if tokens:
        values = _field(logprobs, "token_logprobs") or []
        tops = _field(logprobs, "top_logprobs") or []
        return [TokenLogprob(token=token, logprob=float(values[i]) if i < len(values) and values[i] is not None
                             else float("nan"),
                             top={k: float(v) for k, v in (tops[i] or {}).items()} if i < len(tops) else {})
                for i, token in enumerate(tokens)]
    return None


def result_from_response(response: Any) -> ChatResult:
    if not getattr(response, "choices", None):
        raise openai.APIResponseValidationError(response=_fake_response(), body=None,
                                                message=f"malformed completion: {str(response)[:120]}")
    choice = response.choices[0]
    message = getattr(choice, "message", None)
    text = (message.content if message is not None else getattr(choice, "text", None)) or ""
    tokens = read_logprobs(choice.logprobs)
    if tokens:
        # llama.cpp strips a ```json fence and surrounding whitespace from the chat content but
        # not from the logprobs; keep the text the tokens spell, so positions in one are positions
        # in the other (JSON parsing tolerates the fence).
        spelled = "".join(t.token for t in tokens)
        if spelled != text and text.strip() and text.strip() in spelled:
            text = spelled
    usage = response.usage
    return ChatResult(text=text, logprobs=tokens, cached=False,
                      prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                      completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                      finish_reason=getattr(choice, "finish_reason", None),
                      prompt_logprobs=getattr(choice, "prompt_logprobs", None))  # a vLLM extra field


def _fake_response() -> httpx.Response:
    return httpx.Response(200, request=httpx.Request("POST", "http://invalid/"))


def result_to_dict(result: ChatResult) -> dict[str, Any]:
    out = asdict(result)
    out.pop("cached")
    return out


def result_from_dict(d: dict[str, Any], cached: bool) -> ChatResult:
    tokens = None if d.get("logprobs") is None else [TokenLogprob(**t) for t in d["logprobs"]]
    return ChatResult(text=d["text"], logprobs=tokens, cached=cached, prompt_tokens=d.get("prompt_tokens", 0),
                      completion_tokens=d.get("completion_tokens", 0), finish_reason=d.get("finish_reason"),
                      prompt_logprobs=d.get("prompt_logprobs"), reduced=d.get("reduced"))


class ResultSink:
    """Where per-latent results go as each finishes: kept in `done` (by .key), appended to
    out_path, passed to on_done; so a crash loses only the latents in flight."""

    def __init__(self, done: dict, out_path: str | Path | None = None,
                 on_done: Callable[[Any], None] | None = None) -> None:
        from autointerp.jsonl import JsonlAppender

        self.done, self.on_done = done, on_done
        self.appender = JsonlAppender(out_path) if out_path else None

    def add(self, result: Any) -> None:
        self.done[result.key] = result
        if self.appender:
            self.appender.write(result)
        if self.on_done:
            self.on_done(result)

    def __enter__(self) -> "ResultSink":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.appender:
            self.appender.close()


async def stream_results(coros: list[Coroutine[Any, Any, Any]], done: dict, out_path: str | Path | None = None,
                         on_done: Callable[[Any], None] | None = None) -> None:
    """Run per-latent coroutines concurrently, each result into a ResultSink as it finishes."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    with ResultSink(done, out_path, on_done) as sink:
        try:
            for next_done in asyncio.as_completed(tasks):
                sink.add(await next_done)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
