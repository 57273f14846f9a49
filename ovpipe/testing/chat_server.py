"""A real OpenAI-compatible chat-completions HTTP server on 127.0.0.1, for tests and benchmarks.

It speaks the subset of the protocol that ``vllm serve`` exposes and ovpipe's caption client
uses: ``POST /v1/chat/completions`` (JSON body with ``model``, ``messages`` holding text and
``image_url`` parts, ``max_tokens``, ``temperature``, ``seed``) answered with
``{"choices": [{"message": {"content": ...}, "finish_reason": ...}], "usage": ...}``, and
``GET /v1/models``. Misbehaviour is controllable, per request, from a seeded RNG:

* ``latency_s`` (+ uniform ``jitter_s``): how long each answer takes;
* ``error_rate``: answer with one of ``error_statuses`` (500, 503, 429);
* ``timeout_rate``: hang for ``hang_s`` (longer than the client's timeout);
* ``malformed_rate``: HTTP 200 with a body that is not JSON (cut off, or nested 100,000 deep);
* ``oversized_rate``: HTTP 200 with a body of ``oversized_bytes``;
* ``die()`` / ``revive()``: close the listening socket and every open connection, then listen
  again on the same port (a server that dies mid-run and comes back).

What the captioner "says" is ``reply(request_json, sample_key) -> (text, finish_reason)``; the
default describes the image by a hash of its data URL, in the language of the prompt (Chinese
prompt -> Chinese caption). ``sample_key`` is the ``X-Request-Id`` header up to its first ``/``
(the caption client sends ``<sample_id>/<seed attempt>/<try>``), so tests can script answers per
sample.

Counters (``stats``): requests, in-flight now and at most (hung requests excluded: their clients
have timed out), answers by kind, requests per sample.

Run it alone: ``python -m ovpipe.testing.chat_server --port 8000 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import xxhash
from aiohttp import web

_CJK = re.compile(r"[\u3400-\u9fff]")

Reply = Callable[[dict[str, Any], str], tuple[str, str]]


def default_reply(request: dict[str, Any], sample_key: str) -> tuple[str, str]:
    """A caption that differs per image and follows the prompt's language."""
    prompt, image = "", ""
    for message in request.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            prompt += content
            continue
        for part in content or []:
            if part.get("type") == "text":
                prompt += part.get("text", "")
            elif part.get("type") == "image_url":
                image = part.get("image_url", {}).get("url", "")
    h = xxhash.xxh3_64_intdigest(image.encode())
    pick = [(h >> (8 * i)) % len(w) for i, w in enumerate(_WORDS)]
    if _CJK.search(prompt):
        c, s, p, b = (_WORDS_ZH[i][j] for i, j in enumerate(pick))
        return f"一个{c}的{s}{p}，背景是{b}，图片编号{h % 10**6}。", "stop"
    c, s, p, b = (_WORDS[i][j] for i, j in enumerate(pick))
    return f"A {c} {s} {p}, set against {b}; picture {h % 10**6}.", "stop"


# (colour, shape, where, background) words, so default captions of different images differ a lot
_WORDS = (["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
          ["circle", "square", "triangle", "star", "ring", "cross", "heart"],
          ["sits near the top", "fills the middle", "leans to the left", "hangs at the bottom", "floats right"],
          ["a plain grey wall", "soft morning light", "a striped cloth", "dark wooden boards", "a sandy beach"])
_WORDS_ZH = (["红色", "绿色", "蓝色", "黄色", "紫色", "橙色", "黑色", "白色"],
             ["圆形", "正方形", "三角形", "星形", "圆环", "十字", "心形"],
             ["位于画面上方", "占据画面中央", "偏向左侧", "靠近底部", "漂浮在右边"],
             ["灰色墙面", "清晨柔和的光线", "条纹布料", "深色木板", "沙滩"])


@dataclass
class Behaviour:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 503, 429)
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    malformed_rate: float = 0.0
    oversized_rate: float = 0.0
    oversized_bytes: int = 4 * 1024 * 1024
    seed: int = 0


@dataclass
class Stats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    answers: Counter = field(default_factory=Counter)
    per_sample: Counter = field(default_factory=Counter)
    authorizations: Counter = field(default_factory=Counter)  # Authorization headers seen
    bodies: list = field(default_factory=list)  # last few request bodies, for inspection


class ChatServer:
    """``with ChatServer(latency_s=0.2) as server: server.base_url ...`` (runs in a thread)."""

    def __init__(self, reply: Reply | None = None, port: int = 0, keep_bodies: int = 4, **behaviour: Any):
        self.behaviour = Behaviour(**behaviour)
        self.reply = reply or default_reply
        self.stats = Stats()
        self.keep_bodies = keep_bodies
        self._rng = random.Random(self.behaviour.seed)
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self) -> "ChatServer":
        if not self._port:
            with socket.socket() as s:  # pick a free port once; die()/revive() keep it
                s.bind(("127.0.0.1", 0))
                self._port = s.getsockname()[1]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="chat-server")
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("chat server did not start")
        return self

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(self._listen())
        ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=True, backlog=1024)
        await self._site.start()

    async def _close_connections(self) -> None:
        await self._site.stop()
        server = self._runner.server
        if server is not None:  # drop keep-alive and in-flight connections too
            for conn in list(getattr(server, "connections", [])):
                conn.force_close()
                if conn.transport is not None:
                    conn.transport.abort()

    def _call(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def die(self) -> None:
        """Stop listening and cut every open connection (clients see resets/refusals)."""
        self._call(self._close_connections())

    def revive(self) -> None:
        self._call(self._listen())

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()

    # -- handlers --------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "test-captioner", "object": "model"}]})

    def _draw(self) -> str:
        b = self.behaviour
        with self._lock:
            u = self._rng.random()
        for kind, rate in (("error", b.error_rate), ("timeout", b.timeout_rate),
                           ("malformed", b.malformed_rate), ("oversized", b.oversized_rate)):
            if u < rate:
                return kind
            u -= rate
        return "ok"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        key = request.headers.get("X-Request-Id", "").split("/", 1)[0]
        counted = True
        with self._lock:
            self.stats.requests += 1
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
            self.stats.per_sample[key] += 1
            self.stats.authorizations[request.headers.get("Authorization", "")] += 1
        try:
            body = await request.json()
            if len(self.stats.bodies) < self.keep_bodies:
                self.stats.bodies.append(body)
            kind = self._draw()
            with self._lock:
                delay = b.latency_s + (self._rng.uniform(0, b.jitter_s) if b.jitter_s else 0.0)
                if kind == "timeout":  # its client gives up long before: not counted as in flight
                    self.stats.in_flight -= 1
                    counted = False
                self.stats.answers[kind] += 1  # counted when decided: hung ones never finish
            await asyncio.sleep(b.hang_s if kind == "timeout" else delay)
            if kind == "error":
                with self._lock:
                    status = self._rng.choice(b.error_statuses)
                return web.json_response({"error": {"message": "injected failure", "code": status}}, status=status)
            if kind == "malformed":  # alternately cut-off JSON and JSON nested past any parser's depth
                text = '{"choices": [{"message": {"content": "trunc' if self.stats.answers[kind] % 2 else "[" * 100_000
                return web.Response(text=text, content_type="application/json")
            if kind == "oversized":
                filler = "x" * b.oversized_bytes
                return web.Response(text=json.dumps({"choices": [{"message": {"content": filler},
                                                                  "finish_reason": "stop"}]}),
                                    content_type="application/json")
            text, finish = self.reply(body, key)
            return web.json_response({
                "id": f"chatcmpl-{self.stats.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": 0},
            })
        finally:
            if counted:
                with self._lock:
                    self.stats.in_flight -= 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--error-rate", type=float, default=0.0)
    args = parser.parse_args()
    server = ChatServer(port=args.port, latency_s=args.latency, error_rate=args.error_rate).start()
    print(json.dumps({"base_url": server.base_url}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
