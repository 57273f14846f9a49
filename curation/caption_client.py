"""Async client for an OpenAI-compatible chat-completions server (what ``vllm serve`` exposes).

One ``ChatClient`` per event loop: an aiohttp session with a connection pool of
``max_in_flight`` and a semaphore of the same size, so at most that many requests are ever open.
Each request has a total timeout; connection errors, timeouts, HTTP 408/429/5xx, bodies that are
not JSON and bodies over ``max_response_bytes`` are retried up to ``max_retries`` times with full
jittered exponential backoff (``uniform(0, min(backoff_max_s, backoff_base_s * 2**attempt))``,
at least the server's ``Retry-After`` when it sends one). Other 4xx answers are not retried.
The response body is read in chunks and abandoned past the cap, so a runaway server cannot
exhaust memory. The API key is read from an environment variable, never from the config.

Jitter only changes *when* a request is sent, never what it asks: the output stays a function
of the input and the config.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import aiohttp

RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    attempts: int


class RequestFailed(Exception):
    """No usable answer after the allowed attempts; ``detail`` says why (for the ledger)."""

    def __init__(self, detail: str, attempts: int):
        super().__init__(detail)
        self.detail = detail
        self.attempts = attempts


class _Retryable(Exception):
    def __init__(self, detail: str, retry_after: float = 0.0):
        super().__init__(detail)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ClientSettings:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_in_flight: int = 32
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_base_s: float = 0.25
    backoff_max_s: float = 10.0
    max_response_bytes: int = 1 << 20


class ChatClient:
    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self._semaphore = asyncio.Semaphore(settings.max_in_flight)
        self._session: aiohttp.ClientSession | None = None
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._jitter = random.Random()
        self.retries = 0  # attempts beyond the first, over this client's life

    async def __aenter__(self) -> "ChatClient":
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.settings.api_key_env, "") if self.settings.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connector = aiohttp.TCPConnector(limit=self.settings.max_in_flight, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            headers=headers, connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            json_serialize=json.dumps,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def complete(self, messages: list[dict[str, Any]], *, request_id: str, max_tokens: int,
                       temperature: float, seed: int) -> Completion:
        """One chat completion, retried as described above; raises RequestFailed."""
        body = {"model": self.settings.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed}
        last = ""
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.retries += 1
            try:
                async with self._semaphore:
                    text, finish = await self._post(body, f"{request_id}/{attempt}")
                return Completion(text, finish, attempt + 1)
            except _Retryable as e:
                last = str(e)
                if attempt == self.settings.max_retries:
                    break
                cap = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** attempt)
                await asyncio.sleep(max(self._jitter.uniform(0, cap), min(e.retry_after, self.settings.backoff_max_s)))
            except RequestFailed as e:
                raise RequestFailed(e.detail, attempt + 1) from None
        raise RequestFailed(f"gave up after {self.settings.max_retries + 1} attempts; last error: {last}",
                            self.settings.max_retries + 1)

    async def _post(self, body: dict[str, Any], request_id: str) -> tuple[str, str]:
        try:
            async with self._session.post(self._url, json=body, headers={"X-Request-Id": request_id}) as resp:
                raw = await self._read_capped(resp)
                if resp.status != 200:
                    detail = f"HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace')}"
                    if resp.status in RETRY_STATUSES:
                        raise _Retryable(detail, _retry_after(resp.headers.get("Retry-After")))
                    raise RequestFailed(detail, 0)
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        return _parse(raw)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self.settings.max_response_bytes
        if resp.content_length is not None and resp.content_length > cap:
            raise _Retryable(f"response of {resp.content_length:,} bytes over the cap of {cap:,}")
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > cap:
                raise _Retryable(f"response over the cap of {cap:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _retry_after(value: str | None) -> float:
    try:
        return max(float(value), 0.0) if value else 0.0
    except ValueError:
        return 0.0


def _parse(raw: bytes) -> tuple[str, str]:
    """(content, finish_reason) from a chat-completions body; malformed bodies are retryable."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        finish = choice.get("finish_reason") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:  # deep nesting
        raise _Retryable(f"malformed response ({type(e).__name__}): {raw[:120]!r}") from None
    if not isinstance(text, str):
        raise _Retryable(f"malformed response: content is {type(text).__name__}")
    return text, str(finish)
