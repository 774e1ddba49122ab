"""A deterministic OpenAI-compatible chat-completions server for tests (real HTTP, real protocol).

``POST /v1/chat/completions`` answers the STM extraction prompt (``streams.prompts``) from the prompt alone:
it parses the turn lines ``[n] (YYYY-MM-DD HH:MM) speaker: text`` of the last user message and replies with
valid extraction JSON::

    {"summary": "<speaker> and <speaker> discussed: <first 8 words of the first non-empty turn>",
     "facts": [{"text": "<speaker> (on <YYYY-MM-DD>): <text>", "sources": [n]}, ...]}

with one fact per turn that states something by the product's own content test (``streams.extract.
states_something``, the one offline extraction keeps its facts by: greetings, back-channel, "Bye Nate!" and
empty questions state nothing); a batch of small talk only still gets one fact (its longest turn), as the
prompt asks. Identical prompts give identical answers (the Kafka path can be compared with the embedded path).

It answers the sleep-time compaction prompt (``streams.sleep.prompts``) too, by a rule on the texts alone:
for each (new memory, older memory) pair shown, "delete" when the older memory is a near-duplicate of the new
one — the same normalised words, or word sets with Jaccard overlap ≥ ``DUPLICATE_JACCARD``; two of this
server's own facts only when the same speaker said them, compared without the speaker and date — and nothing
(ignore) otherwise; each older memory at most once. ``parse_compaction_prompt`` reads that prompt back.

Other prompts can be answered by ``register``-ed responders (in-process only; they are asked first); a prompt
nobody answers gets ``{"summary": "", "facts": []}``.

Fault injection: ``server.inject(*faults)`` (or ``POST /control/faults {"faults": [...]}`` from another
process) queues faults, consumed one per chat request, in order:

- ``"500"`` / ``"429"``: that HTTP status with an OpenAI-style error body;
- ``"timeout"``: hold the request (up to ``hang_s``, until the client disconnects) — longer than any test
  client's timeout;
- ``"invalid_json"``: non-JSON content; ``"bad_schema"``: JSON without ``facts`` (or ``decisions``);
  ``"bad_alias"``: the normal answer with every fact's sources replaced by ``[999]`` (a compaction answer: the
  first new memory of the prompt decides about an older memory ``999`` it was not shown, the other new
  memories' decisions stay valid);
- ``"fenced"`` (not a fault): the normal answer wrapped in a Markdown ```json fence;
- ``"no_usage"`` (not a fault): the normal answer without the ``usage`` object.

Inspection: ``server.requests`` (every chat request body, in order), ``server.max_in_flight``;
``GET /control/requests`` → ``{"count", "in_flight", "max_in_flight", "faults_pending"}`` (``?bodies=1`` adds
``"requests"``); ``POST /control/reset`` clears faults, requests and counters; ``POST /control/config
{"latency_s": float, "hang_s": float}`` sets a delay on every answer / the timeout fault's hold.

In-process: ``with LLMServer() as server: server.url`` (``http://127.0.0.1:<free port>/v1``).
Standalone: ``python -m tests.llm_server --port 8089`` prints ``LLM server ready at <url>`` once listening
(``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from streams.extract import participant_names, states_something
from streams.sleep.decide import normalise
from streams.sleep.prompts import COMPACTION_SYSTEM_PROMPT, COMPARE_PREFIX, NEW_HEADER, OLDER_HEADER
from streams.tokens import count_messages_tokens, count_tokens

FAULTS = ("500", "429", "timeout", "invalid_json", "bad_schema", "bad_alias", "fenced", "no_usage")
TURN_LINE = re.compile(r"^\[(\d+)\] \((\d{4}-\d{2}-\d{2}) \d{2}:\d{2}\) (.+?):(?: (.*))?$")
SUMMARY_WORDS = 8
MEMORY_LINE = re.compile(r"^\[(\d+)\] \((\d{4}-\d{2}-\d{2} \d{2}:\d{2})\) (.*)$")
DUPLICATE_JACCARD = 0.75
OWN_FACT = re.compile(r"^(.+?) \(on \d{4}-\d{2}-\d{2}\): (.*)$")  # a fact as extraction_answer writes it

Responder = Callable[[list[dict[str, Any]]], str | None]


def parse_turn_lines(text: str) -> list[tuple[int, str, str, str]]:
    """``(alias, date, speaker, text)`` of every turn line in a prompt."""
    turns = []
    for line in text.splitlines():
        match = TURN_LINE.match(line.rstrip("\r"))
        if match:
            alias, date, speaker, body = match.groups()
            turns.append((int(alias), date, speaker.strip(), (body or "").strip()))
    return turns


def extraction_answer(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The deterministic extraction JSON for a prompt, or None when it holds no turn lines."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        return None
    content = users[-1].get("content")
    if not isinstance(content, str):
        content = " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
    turns = parse_turn_lines(content)
    if not turns:
        return None
    speakers = list(dict.fromkeys(speaker for _, _, speaker, _ in turns))
    spoken = [t for t in turns if t[3]]
    who = " and ".join(speakers)
    if not spoken:
        return {"summary": f"{who} exchanged no content", "facts": []}
    names = participant_names(speakers)
    stating = [t for t in spoken if states_something(t[3], names)]
    if not stating:  # small talk only: the prompt still asks for one fact
        stating = [max(spoken, key=lambda t: (len(t[3]), -t[0]))]
    first_words = " ".join(spoken[0][3].split()[:SUMMARY_WORDS])
    return {
        "summary": f"{who} discussed: {first_words}",
        "facts": [
            {"text": f"{speaker} (on {date}): {body}", "sources": [alias]} for alias, date, speaker, body in stating
        ],
    }


# -- the compaction prompt, read back -------------------------------------------------------------------------

Memory = tuple[int, str, str]  # (alias, "YYYY-MM-DD HH:MM", text)


def is_compaction_prompt(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "system" and m.get("content") == COMPACTION_SYSTEM_PROMPT for m in messages)


def parse_compaction_prompt(messages: list[dict[str, Any]]) -> list[tuple[Memory, list[Memory]]]:
    """Every new memory of a compaction prompt with the memories it is compared with, in prompt order."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise ValueError("not a compaction prompt: no user message")
    shown: dict[int, Memory] = {}
    targets: list[tuple[int, list[int]]] = []
    section = ""
    for line in users[-1]["content"].splitlines():
        if line in (NEW_HEADER, OLDER_HEADER):
            section = line
            continue
        if section == NEW_HEADER and line.startswith(COMPARE_PREFIX) and targets:
            targets[-1][1].extend(int(a) for a in line[len(COMPARE_PREFIX) :].split(","))
            continue
        match = MEMORY_LINE.match(line)
        if not match:
            continue
        item = (int(match.group(1)), match.group(2), match.group(3))
        shown[item[0]] = item
        if section == NEW_HEADER:
            targets.append((item[0], []))
    if not targets or any(not older for _, older in targets):
        raise ValueError("not a compaction prompt: missing the new memories or what they are compared with")
    return [(shown[new], [shown[a] for a in older]) for new, older in targets]


def _words(text: str) -> set[str]:
    return {w for w in normalise(text).split() if len(w) > 2}


def near_duplicate(new: str, old: str) -> bool:
    """Same normalised text, or word sets (words of three letters or more) with Jaccard ≥ ``DUPLICATE_JACCARD``.
    Two facts in this server's own format (``<speaker> (on <date>): <text>``) are compared by what they say:
    only facts of the same speaker, and without the speaker and date (metadata shared by many facts, not
    evidence that two of them say the same thing)."""
    if normalise(new) == normalise(old):
        return True
    own_new, own_old = OWN_FACT.match(new), OWN_FACT.match(old)
    if own_new and own_old:
        if normalise(own_new.group(1)) != normalise(own_old.group(1)):
            return False
        new, old = own_new.group(2), own_old.group(2)
    a, b = _words(new), _words(old)
    return bool(a and b) and len(a & b) / len(a | b) >= DUPLICATE_JACCARD


def compaction_answer(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The deterministic decisions for a compaction prompt (see the module docstring), or None for another."""
    if not is_compaction_prompt(messages):
        return None
    decisions = []
    decided: set[int] = set()
    for (new, _, new_text), older in parse_compaction_prompt(messages):
        for old, _, old_text in older:
            if old not in decided and near_duplicate(new_text, old_text):
                decided.add(old)
                decisions.append({"new": new, "old": old, "action": "delete", "reason": "near-duplicate"})
    return {"decisions": decisions}


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": None}}
    )


class LLMServer:
    """The test server: a FastAPI app under uvicorn, in a background thread (``start``) or in front (``run``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, hang_s: float = 30.0, latency_s: float = 0.0):
        self.host = host
        self.port = port
        self.hang_s = hang_s
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self._faults: deque[str] = deque()
        self._requests: list[dict[str, Any]] = []
        self._responders: list[Responder] = []
        self._in_flight = 0
        self.max_in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.app = self._build_app()

    # -- control (in-process) ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    @property
    def faults_pending(self) -> list[str]:
        with self._lock:
            return list(self._faults)

    def inject(self, *faults: str) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        with self._lock:
            self._faults.extend(faults)

    def register(self, responder: Responder) -> None:
        """Answer other prompts: ``responder(messages)`` returns the content string, or None to pass."""
        with self._lock:
            self._responders.append(responder)

    def reset(self) -> None:
        """Clear queued faults, recorded requests and counters (responders and config stay)."""
        with self._lock:
            self._faults.clear()
            self._requests.clear()
            self.max_in_flight = self._in_flight

    # -- the app ---------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="lightmem test LLM")

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            body = await request.json()
            with self._lock:
                self._requests.append(body)
                fault = self._faults.popleft() if self._faults else None
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                return await self._answer(request, body, fault)
            finally:
                with self._lock:
                    self._in_flight -= 1

        @app.get("/v1/models")
        async def models() -> Any:
            return {"object": "list", "data": [{"id": "test-model", "object": "model", "owned_by": "tests"}]}

        @app.post("/control/faults")
        async def add_faults(payload: dict[str, Any]) -> Any:
            faults = payload.get("faults", [])
            try:
                self.inject(*faults)
            except ValueError as exc:
                return JSONResponse(status_code=422, content={"detail": str(exc)})
            return {"queued": len(self.faults_pending)}

        @app.delete("/control/faults")
        async def clear_faults() -> Any:
            with self._lock:
                self._faults.clear()
            return {"queued": 0}

        @app.get("/control/requests")
        async def requests_count(bodies: bool = False) -> Any:
            with self._lock:
                out: dict[str, Any] = {
                    "count": len(self._requests),
                    "in_flight": self._in_flight,
                    "max_in_flight": self.max_in_flight,
                    "faults_pending": len(self._faults),
                }
                if bodies:
                    out["requests"] = list(self._requests)
            return out

        @app.post("/control/reset")
        async def reset() -> Any:
            self.reset()
            return {"ok": True}

        @app.post("/control/config")
        async def config(payload: dict[str, Any]) -> Any:
            if "latency_s" in payload:
                self.latency_s = float(payload["latency_s"])
            if "hang_s" in payload:
                self.hang_s = float(payload["hang_s"])
            return {"latency_s": self.latency_s, "hang_s": self.hang_s}

        return app

    async def _answer(self, request: Request, body: dict[str, Any], fault: str | None) -> Any:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "500":
            return _error(500, "injected server error", "server_error")
        if fault == "429":
            return _error(429, "injected rate limit", "rate_limit_exceeded")
        if fault == "timeout":
            deadline = time.monotonic() + self.hang_s
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return _error(504, "injected timeout", "timeout")

        messages = body.get("messages") or []
        content = self._content(messages)
        if fault == "invalid_json":
            content = "Sure! Here are the facts: the user likes tea (not JSON at all"
        elif fault == "bad_schema":
            content = json.dumps({"summary": "missing the facts key"})
        elif fault == "bad_alias" and is_compaction_prompt(messages):
            data = json.loads(content)
            first = parse_compaction_prompt(messages)[0][0][0]
            kept = [d for d in data["decisions"] if d.get("new") != first]
            data["decisions"] = [{"new": first, "old": 999, "action": "delete", "reason": "invented"}, *kept]
            content = json.dumps(data)
        elif fault == "bad_alias":
            data = json.loads(content)
            facts = data.get("facts") or [{"text": "an invented fact", "sources": []}]
            data["facts"] = [{**f, "sources": [999]} for f in facts]
            content = json.dumps(data)
        elif fault == "fenced":
            content = f"```json\n{content}\n```"

        flat = [{"role": str(m.get("role", "")), "content": _text(m.get("content"))} for m in messages]
        prompt_tokens = count_messages_tokens(flat)
        completion_tokens = count_tokens(content)
        with self._lock:
            n = len(self._requests)
        answer: dict[str, Any] = {
            "id": f"chatcmpl-test-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test-model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        if fault == "no_usage":
            del answer["usage"]
        return answer

    def _content(self, messages: list[dict[str, Any]]) -> str:
        with self._lock:
            responders = list(self._responders)
        for responder in responders:
            answer = responder(messages)
            if answer is not None:
                return answer
        data = compaction_answer(messages) or extraction_answer(messages)
        return json.dumps(data if data is not None else {"summary": "", "facts": []}, ensure_ascii=False)

    # -- lifecycle -------------------------------------------------------------------------------
    def _uvicorn(self) -> tuple[uvicorn.Server, socket.socket]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1
        )
        return uvicorn.Server(config), sock

    def start(self, timeout_s: float = 10.0) -> LLMServer:
        if self._thread is not None:
            return self
        self._server, self._socket = self._uvicorn()
        server, sock = self._server, self._socket
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="llm-test-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test LLM server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def run(self) -> None:
        """Serve in the foreground until interrupted (standalone mode)."""
        server, sock = self._uvicorn()
        self._server, self._socket = server, sock

        async def ready() -> None:
            while not server.started:
                await asyncio.sleep(0.01)
            print(f"LLM server ready at {self.url}", flush=True)

        async def main() -> None:
            watcher = asyncio.create_task(ready())
            await server.serve(sockets=[sock])
            watcher.cancel()

        try:
            asyncio.run(main())
        finally:
            sock.close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument("--hang-s", type=float, default=30.0, help="how long the 'timeout' fault holds a request")
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay before every answer")
    args = parser.parse_args(argv)
    LLMServer(args.host, args.port, hang_s=args.hang_s, latency_s=args.latency_s).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
