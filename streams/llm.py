"""The one LLM client of the product: every stage that calls an LLM (extraction, sleep-time decisions, the eval
judge) holds an ``LLMClient``.

- **Client.** ``openai.AsyncOpenAI`` against any OpenAI-compatible endpoint (``LLMSettings.base_url``), with the
  client's own retries off: retrying is done here, once, for transport errors and unusable output alike. The
  HTTP connection pool belongs to one event loop; a client reused under a new loop (successive ``asyncio.run``
  calls of a CLI, the eval) is rebuilt instead of failing every call with a closed-loop error.
- **Retries** (tenacity): an attempt fails on an HTTP 5xx/408/409/429, a timeout or connection error, or output
  the caller's ``parse`` rejects (``InvalidOutput``: not JSON, wrong schema, unknown aliases — the re-ask). It is
  retried ``max_retries`` times with exponential backoff (``backoff_s``, doubling). Other 4xx answers (bad key,
  unknown model...) are not retried. The call then returns a ``CallOutcome`` holding the last error; it never
  raises for LLM faults, so each caller dead-letters with the reason.
- **One concurrency limit per process**: calls in flight to an endpoint are bounded by one semaphore per
  (endpoint, ``max_concurrency``), a module-level registry shared by every client in the process (extractor,
  decider and judge built from one ``Settings`` share one), held only while a request is in flight (the backoff
  sleep is outside it). An event loop has its own semaphores (asyncio primitives cannot cross loops); the
  product runs one loop per process.
- **Parsing**: ``parse_model(content, Model)`` is the one path from an LLM's text to a validated pydantic model:
  Markdown fences stripped, JSON (or the outermost ``{...}`` in prose), then the model, with a short error text.
- **Cost**: ``CallOutcome.cost(stage)`` is a ``StageCost`` — calls = HTTP attempts made; tokens from ``usage``
  when the server reports it, else counted with cl100k_base (an attempt that got no response counts none).
- **Naming**: ``LLMClient.label(prompt_version)`` is ``"llm:<model>/<prompt version>"``, recorded in the output
  records (``STMSummary.extractor``, ``MemoryChange.model``) so every memory says which prompt produced it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONObject
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from schemas.records import StageCost
from streams.settings import LLMSettings
from streams.tokens import count_messages_tokens, count_tokens

__all__ = [
    "CallOutcome",
    "InvalidOutput",
    "LLMClient",
    "LLMUnavailable",
    "describe_error",
    "limiter",
    "parse_json",
    "parse_model",
    "retryable",
]

log = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_RETRYABLE_STATUS = {408, 409, 429}
_JSON_OBJECT: ResponseFormatJSONObject = {"type": "json_object"}


class InvalidOutput(ValueError):
    """The LLM answered, but its output cannot be used (not JSON, wrong schema, bad aliases...)."""

    def __init__(self, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.error_type = error_type
        self.reason = reason


class LLMUnavailable(RuntimeError):
    """An LLM call was asked for without an OpenAI-compatible endpoint (``LLMSettings.base_url`` unset)."""


# -- parsing ------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_json(content: str | None, error: type[InvalidOutput] = InvalidOutput) -> object:
    """The JSON value of an LLM's text: ```json fences stripped; else the outermost ``{...}`` of the text."""
    if content is None or not content.strip():
        raise error("EmptyResponse", "the LLM returned no content")
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(text[start : end + 1])
            except json.JSONDecodeError:
                pass
        raise error("InvalidJSON", f"content is not JSON ({exc}): {content[:200]!r}") from exc


def validation_text(exc: ValidationError, limit: int = 5) -> str:
    """The first ``limit`` errors of a pydantic validation as ``loc: message; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:limit])


def parse_model(
    content: str | None, model: type[M], *, what: str = "response", error: type[InvalidOutput] = InvalidOutput
) -> M:
    """An LLM's text → a validated ``model``, or ``error`` (EmptyResponse / InvalidJSON / SchemaViolation)."""
    data = parse_json(content, error)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error("SchemaViolation", f"JSON does not match the {what} schema: {validation_text(exc)}") from exc


# -- errors and retries -------------------------------------------------------------------------------------


def retryable(exc: BaseException) -> bool:
    """Invalid output, transport errors and HTTP 5xx/408/409/429 are retried; other HTTP errors are final."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in _RETRYABLE_STATUS
    return isinstance(exc, InvalidOutput | openai.OpenAIError)


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(error_type, reason) of an attempt's failure."""
    if isinstance(exc, InvalidOutput):
        return exc.error_type, exc.reason
    if isinstance(exc, openai.APIStatusError):
        return type(exc).__name__, exc.message  # "Error code: <status> - <server message>"
    return type(exc).__name__, str(exc) or type(exc).__name__


# -- the process-wide limiter ------------------------------------------------------------------------------

_SEMAPHORES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def limiter(endpoint: str, limit: int) -> asyncio.Semaphore:
    """The semaphore bounding calls in flight to ``endpoint`` in this process (for the running event loop).

    Keyed by endpoint and limit: every client built from the same settings (the extractor, the decider, the
    judge of one process) shares one; a client configured with another limit gets its own (tests do that).
    """
    per_loop = _SEMAPHORES.setdefault(asyncio.get_running_loop(), {})
    key = (endpoint, limit)
    if key not in per_loop:
        per_loop[key] = asyncio.Semaphore(limit)
    return per_loop[key]


# -- outcomes -----------------------------------------------------------------------------------------------


@dataclass
class CallOutcome(Generic[T]):
    """What one retried LLM call came to: the parsed value, or the last error; calls and tokens either way."""

    value: T | None
    calls: int
    input_tokens: int
    output_tokens: int
    error: BaseException | None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def cost(self, stage: str, items: int = 0) -> StageCost:
        return StageCost(
            stage=stage,  # type: ignore[arg-type]
            calls=self.calls,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            seconds=self.seconds,
            items=items,
        )


@dataclass
class _Tally:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


# -- the client ----------------------------------------------------------------------------------------------


class LLMClient:
    """An OpenAI-compatible chat endpoint with retries, the process-wide limit, parsing and cost."""

    def __init__(self, settings: LLMSettings) -> None:
        if not settings.base_url:
            raise LLMUnavailable("no LLM endpoint: set LIGHTMEM_LLM__BASE_URL (and LIGHTMEM_LLM__MODEL)")
        self.settings = settings
        self.endpoint: str = settings.base_url
        self.model = settings.model
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = self._new_client()

    def label(self, prompt_version: str) -> str:
        """``llm:<model>/<prompt version>``: what output records name as their producer."""
        return f"llm:{self.model}/{prompt_version}"

    def _new_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.endpoint,
            api_key=self.settings.api_key.get_secret_value(),
            timeout=self.settings.timeout_s,
            max_retries=0,
        )

    def _session(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """The HTTP client bound to the running loop (rebuilt under a new loop) and the endpoint's limiter."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            log.info("LLM client reused under a new event loop: rebuilding its HTTP client")
            self._loop = loop
            self._client = self._new_client()
        return self._client, limiter(self.endpoint, self.settings.max_concurrency)

    async def aclose(self) -> None:
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            return  # its connections died with their loop
        await self._client.close()

    async def call_json(self, messages: Messages, parse: Callable[[str | None], T], label: str) -> CallOutcome[T]:
        """One JSON chat call (``response_format`` json_object); ``parse`` the reply's content into the result or
        raise ``InvalidOutput`` (then the call is asked again, like an HTTP error is retried)."""
        return await self._call(messages, parse, label, json_mode=True, max_tokens=self.settings.max_output_tokens)

    async def call_text(self, messages: Messages, label: str, *, max_tokens: int | None = None) -> CallOutcome[str]:
        """One plain-text chat call; the content ("" when none) is the value."""
        return await self._call(
            messages,
            lambda content: content or "",
            label,
            json_mode=False,
            max_tokens=max_tokens or self.settings.max_output_tokens,
        )

    async def _call(
        self, messages: Messages, parse: Callable[[str | None], T], label: str, *, json_mode: bool, max_tokens: int
    ) -> CallOutcome[T]:
        started = time.perf_counter()
        tally = _Tally()
        attempts = self.settings.max_retries + 1

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if exc is not None:
                error_type, reason = describe_error(exc)
                log.warning(
                    "%s: attempt %d/%d failed (%s: %s); retrying",
                    label,
                    state.attempt_number,
                    attempts,
                    error_type,
                    reason[:300],
                )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=self.settings.backoff_s, min=self.settings.backoff_s),
            retry=retry_if_exception(retryable),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            value: T = await retrying(self._attempt, messages, parse, label, tally, json_mode, max_tokens)
        except (InvalidOutput, openai.OpenAIError) as exc:
            error_type, reason = describe_error(exc)
            log.warning("%s: failed after %d attempt(s) (%s: %s)", label, tally.calls, error_type, reason[:300])
            return CallOutcome(
                None, tally.calls, tally.input_tokens, tally.output_tokens, exc, time.perf_counter() - started
            )
        return CallOutcome(
            value, tally.calls, tally.input_tokens, tally.output_tokens, None, time.perf_counter() - started
        )

    async def _attempt(
        self,
        messages: Messages,
        parse: Callable[[str | None], T],
        label: str,
        tally: _Tally,
        json_mode: bool,
        max_tokens: int,
    ) -> T:
        client, semaphore = self._session()
        async with semaphore:
            tally.calls += 1
            response = await client.chat.completions.create(
                model=self.model,
                messages=cast("list[ChatCompletionMessageParam]", list(messages)),
                temperature=self.settings.temperature,
                max_tokens=max_tokens,
                response_format=_JSON_OBJECT if json_mode else openai.omit,
            )
        content = response.choices[0].message.content if response.choices else None
        if response.usage is not None:
            tally.input_tokens += response.usage.prompt_tokens
            tally.output_tokens += response.usage.completion_tokens
        else:
            tally.input_tokens += count_messages_tokens(list(messages))
            tally.output_tokens += count_tokens(content or "")
        if response.choices and response.choices[0].finish_reason == "length" and content:
            log.warning("%s: output truncated at %d tokens", label, max_tokens)
        return parse(content)
