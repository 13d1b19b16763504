"""The one OpenAI-compatible client path of every LLM judge.

* :class:`EndpointSettings` - where and how to call (model, base URL, sampling, structured-output style,
  concurrency, retry/back-off, online vs Batch API). The API key is never part of it: only the *name* of
  the environment variable is, and the key is read from ``os.environ`` when the ``openai.AsyncOpenAI``
  client is built.
* :class:`LLMRequest` -> :func:`request_key` (sha256 of the canonical request; endpoint URL and key are not
  part of it) -> :class:`LLMResponse`.
* :class:`LLMClient` - cache first (one query for all keys), then only the misses are sent, ``concurrency``
  requests in flight, our own retry loop (exponential back-off with full jitter, ``Retry-After`` honoured) on
  429 / 408 / 5xx / timeouts / connection errors; each answer is written to the :class:`ResponseCache` as it
  arrives (buffered: every 32 answers or 0.5 s, and always at the end / on exception / on cancellation).
  ``mode="batch"`` sends the misses through the OpenAI Batch API instead (one job per chunk of at most
  ``batch_chunk_size`` requests and ``batch_chunk_bytes`` bytes of input file, jobs recorded in ``llm_batches``
  so an interrupted run resumes by polling instead of resubmitting). For a whole dataset,
  :meth:`LLMClient.batch_prefetch` submits every request first (streaming, one chunk in memory at a time) and
  then waits for all jobs at once, instead of one job per call of :meth:`LLMClient.complete_many`.

Transport: openai's aiohttp transport when ``aiohttp`` is installed (``openai[aiohttp]``), else httpx2;
``LLMClient(..., http_backend=...)`` forces one. A caller-supplied ``http_client`` (tests: ``httpx.AsyncClient``
with ``httpx.MockTransport``) is used as is.

Plain module: no Dagster imports.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import openai

from rlhn_assets.lib.llm.types import TERMINAL_BATCH_STATUSES, CacheRow, LLMResponse

try:  # openai >= 3 talks through httpx2; it also accepts legacy httpx clients (tests use those)
    import httpx2 as _hx
except ImportError:  # pragma: no cover - older openai
    _hx = httpx

_HAVE_AIOHTTP = importlib.util.find_spec("aiohttp") is not None

if TYPE_CHECKING:  # the cache module does not import this one (shared types are in types.py): no cycle
    from rlhn_assets.lib.llm.cache import ResponseCache

log = logging.getLogger(__name__)

KEY_VERSION = 2  # bump when the key payload changes (invalidates every cached answer); 2: model identity
BATCH_ENDPOINT = "/v1/chat/completions"
_STYLES = ("json_schema", "json_object_schema", "none")
_RECENT_ANSWERS = 4096  # answers kept per loop for concurrent calls (see _LoopState.recent)


class LLMConfigError(RuntimeError):
    """The endpoint cannot be used as configured (e.g. no API key for api.openai.com)."""


# ---------------------------------------------------------------------------------------------- data types
OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class EndpointSettings:
    model: str
    base_url: str | None = None  # None = api.openai.com
    # What the model IS, beyond the name the request sends: ``gguf-sha256:<hex>`` for a local GGUF (the server
    # runs on a random port under an alias); None = ``<base_url>|<model>`` for a remote endpoint. Part of the
    # cache key, so two models under one alias never share an answer.
    model_identity: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var; the key is read at client build time only
    temperature: float = 0.1
    max_tokens: int = 2048
    response_format_style: Literal["json_schema", "json_object_schema", "none"] = "none"
    concurrency: int = 8  # max requests in flight
    max_retries: int = 5  # on 429 / 408 / 5xx / timeouts / connection errors
    backoff_base_s: float = 1.0  # sleep uniform(0, min(backoff_max_s, base * 2**attempt)); Retry-After wins
    backoff_max_s: float = 60.0
    timeout_s: float = 120.0
    seed: int | None = None
    mode: Literal["online", "batch"] = "online"
    # One Batch API job holds at most this many requests and this many bytes of input file. OpenAI's limits are
    # 50,000 requests and 200 MB per file; the defaults sit at / just under them (fewest jobs, least polling).
    # Lower them when a provider drops rows of large jobs (the RLHN authors saw that on Azure OpenAI and used a
    # few hundred requests per job), when a job would exceed the organisation's enqueued-token limit for the
    # model (the job then fails as a whole), or to get answers - and progress - earlier: a job's answers arrive
    # only when the whole job completes.
    batch_chunk_size: int = 50_000
    batch_chunk_bytes: int = 190_000_000
    batch_poll_s: float = 60.0
    batch_completion_window: str = "24h"

    @property
    def identity(self) -> str:
        return self.model_identity or f"{(self.base_url or OPENAI_BASE_URL).rstrip('/')}|{self.model}"

    def __post_init__(self) -> None:
        if self.response_format_style not in _STYLES:
            raise ValueError(f"response_format_style must be one of {_STYLES}, got {self.response_format_style!r}")
        if self.mode not in ("online", "batch"):
            raise ValueError(f"mode must be 'online' or 'batch', got {self.mode!r}")
        if self.concurrency < 1 or self.batch_chunk_size < 1 or self.batch_chunk_bytes < 1 or self.max_retries < 0:
            raise ValueError("concurrency, batch_chunk_size and batch_chunk_bytes must be >= 1, max_retries >= 0")


@dataclass(frozen=True)
class LLMRequest:
    messages: tuple[dict, ...]  # chat messages (role/content)
    prompt_version: str
    max_tokens: int | None = None  # overrides EndpointSettings.max_tokens
    top_logprobs: int | None = None  # request logprobs=True, top_logprobs=N
    json_schema: dict | None = None  # structured output, sent according to response_format_style
    attempt: int = 0  # salt: a re-ask after an unparsable/truncated answer uses attempt+1 (a new cache key)


@dataclass
class ClientStats:
    """Cumulative over the client's life. ``calls_made`` counts distinct requests sent to the endpoint
    (online: each cache miss once, whatever its retries; batch: each request submitted in a new job),
    ``retries`` the extra attempts, ``errors`` the requests that came back with ``error`` set."""

    calls_made: int = 0
    cache_hits: int = 0
    retries: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    wall_s: float = 0.0
    batches_submitted: int = 0
    batches_resumed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- request building
def effective_max_tokens(settings: EndpointSettings, req: LLMRequest) -> int:
    return int(req.max_tokens if req.max_tokens is not None else settings.max_tokens)


def response_format_for(settings: EndpointSettings, req: LLMRequest) -> dict | None:
    if req.json_schema is None or settings.response_format_style == "none":
        return None
    if settings.response_format_style == "json_schema":  # OpenAI / native llama-server
        return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": req.json_schema, "strict": True}}
    return {"type": "json_object", "schema": req.json_schema}  # llama-cpp-python's server extension


def build_body(settings: EndpointSettings, req: LLMRequest) -> dict:
    """The chat-completions request body (online calls and Batch API lines alike). No credentials."""
    body: dict[str, Any] = {
        "model": settings.model,
        "messages": [dict(m) for m in req.messages],
        "temperature": settings.temperature,
        "max_tokens": effective_max_tokens(settings, req),
    }
    if settings.seed is not None:
        body["seed"] = settings.seed
    if req.top_logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = int(req.top_logprobs)
    rf = response_format_for(settings, req)
    if rf is not None:
        body["response_format"] = rf
    return body


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def request_key(settings: EndpointSettings, req: LLMRequest) -> str:
    """sha256 hex of the canonical JSON of everything that determines the answer: model and the model's
    identity (``EndpointSettings.identity``: the GGUF's sha256 for a local model, endpoint URL + model name for a
    remote one), prompt_version, messages, temperature, effective max_tokens, top_logprobs, json_schema +
    response_format_style (the style only when a schema is given - without one nothing is sent), seed and
    attempt. The API key is never part of it; a local server's URL (a random port) is not either."""
    payload = {
        "v": KEY_VERSION,
        "model": settings.model,
        "model_identity": settings.identity,
        "prompt_version": req.prompt_version,
        "messages": [dict(m) for m in req.messages],
        "temperature": settings.temperature,
        "max_tokens": effective_max_tokens(settings, req),
        "top_logprobs": req.top_logprobs,
        "json_schema": req.json_schema,
        "response_format_style": settings.response_format_style if req.json_schema is not None else None,
        "seed": settings.seed,
        "attempt": req.attempt,
    }
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- response parsing
def parse_completion(key: str, data: dict, latency_s: float, want_logprobs: bool) -> LLMResponse:
    """A chat.completion JSON object -> LLMResponse. Missing ``usage`` counts as 0 tokens."""
    choices = data.get("choices") or []
    if not choices:
        raise ValueError("response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    top = None
    if want_logprobs and choice.get("logprobs") is not None:
        content = choice["logprobs"].get("content") or []
        top = [[(str(t["token"]), float(t["logprob"])) for t in (tok.get("top_logprobs") or [])] for tok in content]
    return LLMResponse(
        key=key,
        text=message.get("content"),
        finish_reason=choice.get("finish_reason"),
        tokens_in=int(usage.get("prompt_tokens") or 0),
        tokens_out=int(usage.get("completion_tokens") or 0),
        latency_s=float(latency_s),
        top_logprobs=top,
        cached=False,
    )


def _error_response(key: str, error: str, latency_s: float = 0.0) -> LLMResponse:
    return LLMResponse(
        key=key,
        text=None,
        finish_reason=None,
        tokens_in=0,
        tokens_out=0,
        latency_s=latency_s,
        top_logprobs=None,
        cached=False,
        error=error,
    )


def _retry_after_s(response: Any) -> float | None:
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _classify(exc: BaseException) -> tuple[bool, float | None]:
    """(retryable, retry_after_s) for an openai exception."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True, None
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        if code == 429 or code == 408 or code >= 500:
            return True, _retry_after_s(exc.response)
    return False, None


def _describe(exc: BaseException, attempts: int) -> str:
    status = getattr(exc, "status_code", None)
    head = f"{type(exc).__name__}" + (f" (HTTP {status})" if status is not None else "")
    msg = str(exc).strip().replace("\n", " ")
    if len(msg) > 500:
        msg = msg[:500] + "..."
    return f"{head} after {attempts} attempt(s): {msg}"


# ---------------------------------------------------------------------------------------------- helpers
class _Secret:
    """Holds an explicitly passed API key; never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("API keys are not picklable")


@dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    oai: openai.AsyncOpenAI
    sem: asyncio.Semaphore
    owns_http: bool
    # key -> the answer being fetched: a request that is already in flight for another call of this client on
    # this loop (the overlapping rounds of a judging step) waits for that answer instead of being sent twice
    in_flight: dict = field(default_factory=dict)
    # the latest answers received on this loop: another call that looked the cache up before they were written
    # finds them here (bounded: the older ones are in the cache by the time a call starts)
    recent: collections.OrderedDict = field(default_factory=collections.OrderedDict)


class _CacheWriter:
    """Buffers successful answers and writes them from a worker thread every ``every`` rows or ``interval_s``
    (DuckDB releases the GIL, so the event loop keeps serving responses meanwhile). :meth:`aclose` waits for a
    write in progress and writes whatever is left - also on exception / cancellation."""

    def __init__(self, cache: ResponseCache, every: int, interval_s: float, pending: set):
        self.cache = cache
        self.pending = pending  # the client's set of writes not finished yet (close() waits for them)
        self.every = every
        self.interval_s = interval_s
        self.buf: list = []
        self.written = 0
        self._event = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-cache-writer")
        self._inflight: concurrent.futures.Future | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def add(self, row) -> None:
        self.buf.append(row)
        if len(self.buf) >= self.every:
            self._event.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._event.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._event.clear()
            if self.buf:
                rows, self.buf = self.buf, []
                self._inflight = self._pool.submit(self.cache.put_many, rows)
                self.pending.add(self._inflight)
                self._inflight.add_done_callback(self.pending.discard)
                # shield: cancelling this task must not cancel a write that holds rows already taken from buf
                self.written += await asyncio.shield(asyncio.wrap_future(self._inflight))
                self._inflight = None

    async def aclose(self) -> None:
        """Write what is left, waiting for the writes without blocking the event loop: other calls of the same
        client (the overlapping rounds of a judging step, defs/judge/assets.py) keep being served meanwhile. A
        synchronous wait here held every in-flight call of the other round for the length of a DuckDB commit
        (~0.3 s per round at 100K answers in the cache: bench_scale, docs/benchmarks.md). Also runs on
        exception / cancellation; if this coroutine is itself cancelled, the write goes on in the writer's thread
        and :meth:`LLMClient.close` waits for it (``pending``)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        try:
            if self._inflight is not None:
                inflight = self._inflight
                await asyncio.shield(asyncio.wrap_future(inflight))  # re-raises its error
                self._inflight = None
            rows, self.buf = self.buf, []
            if rows:
                final = self._pool.submit(self.cache.put_many, rows)
                self.pending.add(final)
                final.add_done_callback(self.pending.discard)
                self.written += await asyncio.shield(asyncio.wrap_future(final))
        finally:
            self._pool.shutdown(wait=False)
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()


class _Progress:
    def __init__(self, label: str, total: int, cache_hits: int, callback: Callable[[str], None] | None):
        self.label, self.total, self.cache_hits, self.callback = label, total, cache_hits, callback
        self.step = max(1, math.ceil(total / 20))  # ~every 5%
        self.done = self.answered = self.errors = 0
        self.t0 = time.perf_counter()

    def tick(self, resp: LLMResponse) -> None:
        self.done += 1
        if resp.error is None:
            self.answered += 1
        else:
            self.errors += 1
        if self.callback is not None and (self.done % self.step == 0 or self.done == self.total):
            self.emit()

    def emit(self, extra: str = "") -> None:
        if self.callback is None:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.callback(
            f"{self.label}: {self.done}/{self.total} calls done ({self.answered} answered, "
            f"{self.errors} errors), {self.cache_hits} cache hits, {self.done / dt:.1f} calls/s{extra}"
        )


def batch_line(settings: EndpointSettings, key: str, req: LLMRequest) -> bytes:
    """One line of a Batch API input file (UTF-8, with its newline)."""
    body = build_body(settings, req)
    return (_canonical_json({"custom_id": key, "method": "POST", "url": BATCH_ENDPOINT, "body": body}) + "\n").encode(
        "utf-8"
    )


class BatchChunker:
    """Groups Batch API input lines into files of at most ``max_requests`` lines and ``max_bytes`` bytes: :meth:`add`
    returns the finished chunk (keys, file bytes) when the new line does not fit the current one, :meth:`flush` the
    last one. A single line above ``max_bytes`` gets a file of its own (the API then rejects that job, and the
    error names it)."""

    def __init__(self, max_requests: int, max_bytes: int):
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("max_requests and max_bytes must be >= 1")
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self._keys: list[str] = []
        self._lines: list[bytes] = []
        self._bytes = 0

    def add(self, key: str, line: bytes) -> tuple[list[str], bytes] | None:
        done = None
        if self._keys and (len(self._keys) >= self.max_requests or self._bytes + len(line) > self.max_bytes):
            done = self.flush()
        self._keys.append(key)
        self._lines.append(line)
        self._bytes += len(line)
        return done

    def flush(self) -> tuple[list[str], bytes] | None:
        if not self._keys:
            return None
        out = (self._keys, b"".join(self._lines))
        self._keys, self._lines, self._bytes = [], [], 0
        return out

    def __len__(self) -> int:
        return len(self._keys)


def chunk_batch_lines(
    lines: Iterable[tuple[str, bytes]], max_requests: int, max_bytes: int
) -> Iterable[tuple[list[str], bytes]]:
    """(keys, file bytes) per Batch API job for ``(key, line)`` pairs, in order (see :class:`BatchChunker`)."""
    chunker = BatchChunker(max_requests, max_bytes)
    for key, line in lines:
        done = chunker.add(key, line)
        if done is not None:
            yield done
    last = chunker.flush()
    if last is not None:
        yield last


@dataclass(frozen=True)
class _Submitted:
    """What :meth:`LLMClient.batch_prefetch` keeps per submitted request instead of the request itself (whose
    messages, ~10 KB for a listwise call, would add up to gigabytes over a dataset): the request body is read back
    from the job's spooled input file when the answers are saved."""

    prompt_version: str
    want_logprobs: bool


@dataclass
class BatchJob:
    """One Batch API job as this client saw it (asset metadata: ``batch_jobs``)."""

    batch_id: str
    requests: int
    input_bytes: int | None  # None for a job resumed from an earlier run
    status: str
    submitted: bool  # False = resumed (submitted by an earlier, interrupted run)
    t0: float  # perf_counter when submitted / first seen
    seconds: float = 0.0  # until it reached a terminal state (or until now)
    answers: int = 0


# ---------------------------------------------------------------------------------------------- the client
class LLMClient:
    """Cache-first, concurrent, retrying OpenAI-compatible chat client. See the module docstring.

    One ``openai.AsyncOpenAI`` (``max_retries=0``: the retries are ours) per event loop; :meth:`complete_many`
    runs a fresh loop per call and closes the client it built at the end. A caller-provided ``http_client``
    is used as is and never closed here.
    """

    flush_every: int = 32
    flush_interval_s: float = 0.5

    def __init__(
        self,
        settings: EndpointSettings,
        cache: ResponseCache,
        *,
        http_client: httpx.AsyncClient | None = None,
        api_key: str | None = None,
        http_backend: Literal["auto", "httpx", "aiohttp"] = "auto",
        keep_loop: bool = False,
    ):
        """``keep_loop``: run every :meth:`complete_many` on one event loop in a helper thread that lives until
        :meth:`close`, so the HTTP client and its connections are reused from call to call (a judging step calls
        once per round of instances; building and closing them each time cost a judging step ~10% of its calls/s
        in bench_scale, docs/benchmarks.md). Without it, each call runs a fresh loop and closes what it built."""
        self.settings = settings
        self.cache = cache
        self.stats = ClientStats()
        self._http_client = http_client
        if http_backend not in ("auto", "httpx", "aiohttp"):
            raise ValueError(f"http_backend must be 'auto', 'httpx' or 'aiohttp', got {http_backend!r}")
        self.http_backend = http_backend
        self._api_key = _Secret(api_key) if api_key else None
        self._state: _LoopState | None = None
        self.batch_jobs: dict[str, BatchJob] = {}  # every Batch API job this client submitted or resumed
        self._spool_mem: dict[str, bytes] = {}  # prefetched jobs' input files when the cache is in memory
        self.keep_loop = keep_loop
        self._bg: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
        self._bg_lock = threading.Lock()  # complete_many may be called from several threads at once
        self._pending_writes: set[concurrent.futures.Future] = set()  # cache writes close() waits for

    def __repr__(self) -> str:
        s = self.settings
        return f"LLMClient(model={s.model!r}, base_url={s.base_url!r}, mode={s.mode!r}, concurrency={s.concurrency})"

    # ------------------------------------------------------------------------------ openai client per loop
    def _resolve_api_key(self) -> str:
        if self._api_key is not None:
            return self._api_key.get()
        key = os.environ.get(self.settings.api_key_env)
        if key:
            return key
        if self.settings.base_url is None:
            raise LLMConfigError(
                f"environment variable {self.settings.api_key_env} is not set (needed for api.openai.com)"
            )
        return "no-key"  # local OpenAI-compatible servers ignore the key, but the SDK needs one

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        st = self._state
        if st is not None and st.loop is loop:
            return st
        s = self.settings
        http = self._http_client
        owns = http is None
        if http is None:
            http = self._build_http_client()
        oai = openai.AsyncOpenAI(
            base_url=s.base_url, api_key=self._resolve_api_key(), max_retries=0, timeout=s.timeout_s, http_client=http
        )
        self._state = _LoopState(loop=loop, oai=oai, sem=asyncio.Semaphore(s.concurrency), owns_http=owns)
        return self._state

    def _build_http_client(self) -> Any:
        """openai's aiohttp transport when installed (``openai[aiohttp]``: ~35% less client CPU per call than
        httpx2/anyio, which is what limits throughput at many requests in flight), else httpx2."""
        s = self.settings
        kwargs = dict(
            timeout=_hx.Timeout(s.timeout_s, connect=min(10.0, s.timeout_s)),
            limits=_hx.Limits(
                max_connections=max(100, 2 * s.concurrency), max_keepalive_connections=max(20, s.concurrency)
            ),
            follow_redirects=True,
        )
        backend = self.http_backend
        if backend == "auto":
            backend = "aiohttp" if _HAVE_AIOHTTP and _hx is not httpx else "httpx"
        if backend == "aiohttp":
            return openai.DefaultAioHttpClient(**kwargs)
        return _hx.AsyncClient(**kwargs)

    @property
    def http_backend_in_use(self) -> str:
        """What :meth:`_build_http_client` picks (``"custom"`` when an http_client was passed in)."""
        if self._http_client is not None:
            return "custom"
        if self.http_backend == "auto":
            return "aiohttp" if _HAVE_AIOHTTP and _hx is not httpx else "httpx"
        return self.http_backend

    async def aclose(self) -> None:
        st, self._state = self._state, None
        if st is not None and st.owns_http:
            await st.oai.close()

    # ------------------------------------------------------------------------------ public API
    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._bg_lock:
            if self._bg is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="llm-client-loop", daemon=True)
                thread.start()
                self._bg = (loop, thread)
            return self._bg[0]

    def _run_on_background_loop(self, coro) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._background_loop())
        try:
            return fut.result()
        except BaseException:
            # interrupted here (or failed there): cancel the task. Its cleanup (the cache writer's final flush)
            # runs on the loop before anything scheduled later, so close() - which open_judge calls before it
            # closes the cache - returns only after that flush.
            fut.cancel()
            raise

    def close(self) -> None:
        """Stop the helper loop of ``keep_loop`` (closing the HTTP client first) and wait for cache writes still
        running (those of a call interrupted while it wrote)."""
        with self._bg_lock:
            bg, self._bg = self._bg, None
        try:
            if bg is not None:
                loop, thread = bg
                try:
                    asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=30)
                finally:
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(timeout=30)
                    loop.close()
        finally:
            concurrent.futures.wait(list(self._pending_writes))

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def complete_many(
        self, requests: Sequence[LLMRequest], progress: Callable[[str], None] | None = None
    ) -> list[LLMResponse]:
        """Synchronous wrapper: runs :meth:`acomplete_many` (online or batch per ``settings.mode``) on the helper
        loop (``keep_loop``) or in a fresh event loop; from inside a running loop it uses a helper thread."""
        return self._run_sync(self.acomplete_many(requests, progress))

    def _run_sync(self, coro) -> Any:
        """Run ``coro`` from synchronous code: on the helper loop (``keep_loop``), else in a fresh event loop that
        closes this loop's HTTP client at the end (from inside a running loop, on a helper thread)."""
        if self.keep_loop:
            return self._run_on_background_loop(coro)

        async def runner() -> Any:
            try:
                return await coro
            finally:
                await self.aclose()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(runner())
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-client") as ex:
            return ex.submit(asyncio.run, runner()).result()

    async def acomplete_many(
        self, requests: Sequence[LLMRequest], progress: Callable[[str], None] | None = None
    ) -> list[LLMResponse]:
        """Responses in the order of ``requests``; requests with the same key are asked once."""
        t0 = time.perf_counter()
        try:
            # Off the event loop: the keys' hashing and the cache lookup (which waits for a cache write holding
            # the cache's lock) would otherwise stall the answers of another call in flight on this loop.
            keys, unique, results = await asyncio.to_thread(self._lookup, requests)
            self.stats.cache_hits += len(results)
            todo = [(k, r) for k, r in unique.items() if k not in results]
            label = f"llm[{self.settings.model}]"
            if todo:
                if self.settings.mode == "batch":
                    results.update(await self._run_batch(todo, progress, len(results), label))
                else:
                    results.update(await self._run_online(todo, progress, len(results), label))
            elif progress is not None:
                progress(f"{label}: 0 calls needed, {len(results)} cache hits")
            return [results[k] for k in keys]
        finally:
            self.stats.wall_s += time.perf_counter() - t0

    def _lookup(
        self, requests: Sequence[LLMRequest]
    ) -> tuple[list[str], dict[str, LLMRequest], dict[str, LLMResponse]]:
        """(each request's key, the distinct requests by key, the cached answers among them)."""
        keys = [request_key(self.settings, r) for r in requests]
        unique: dict[str, LLMRequest] = {}
        for k, r in zip(keys, requests):
            unique.setdefault(k, r)
        return keys, unique, (self.cache.get_many(unique) if unique else {})

    # ------------------------------------------------------------------------------ online
    async def _run_online(
        self, todo: list[tuple[str, LLMRequest]], progress, n_hits: int, label: str
    ) -> dict[str, LLMResponse]:
        st = self._loop_state()
        s = self.settings
        out: dict[str, LLMResponse] = {}
        writer = _CacheWriter(self.cache, self.flush_every, self.flush_interval_s, self._pending_writes)
        prog = _Progress(label, len(todo), n_hits, progress)
        pending = iter(todo)

        async def worker() -> None:
            for key, req in pending:  # shared iterator: each request is taken by exactly one worker
                shared = await self._answer_in_flight(st, key)
                if shared is not None:  # another call of this client fetched it meanwhile: no second request
                    out[key] = shared
                    prog.tick(shared)
                    continue
                mine = st.loop.create_future()
                st.in_flight[key] = mine
                try:
                    body = build_body(s, req)
                    resp = await self._call(st, key, body, req.top_logprobs is not None)
                    mine.set_result(resp)
                finally:
                    del st.in_flight[key]
                    if not mine.done():  # this call was cancelled: a waiter sends the request itself
                        mine.cancel()
                out[key] = resp
                if resp.error is None:
                    writer.add(CacheRow(resp, s.model, req.prompt_version, body))
                    st.recent[key] = resp
                    if len(st.recent) > _RECENT_ANSWERS:
                        st.recent.popitem(last=False)
                prog.tick(resp)

        writer.start()
        workers = [asyncio.create_task(worker()) for _ in range(min(len(todo), s.concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await writer.aclose()
        return out

    @staticmethod
    async def _answer_in_flight(st: _LoopState, key: str) -> LLMResponse | None:
        """The answer to ``key`` if another call on this loop got it after this call's cache lookup or is fetching
        it now (as a cache hit: this call made no request), else None."""
        if (done := st.recent.get(key)) is not None:
            return dataclasses.replace(done, cached=True)
        while (other := st.in_flight.get(key)) is not None:
            try:
                resp = await asyncio.shield(other)
            except asyncio.CancelledError:
                if not other.cancelled() or asyncio.current_task().cancelling():
                    raise  # this call itself is being cancelled
                continue  # the fetching call was cancelled: fetch it here (unless a third one took it over)
            return dataclasses.replace(resp, cached=True) if resp.error is None else None
        return None

    async def _call(self, st: _LoopState, key: str, body: dict, want_logprobs: bool) -> LLMResponse:
        s = self.settings
        self.stats.calls_made += 1
        attempt = 0
        while True:
            t0 = time.perf_counter()
            try:
                async with st.sem:
                    t0 = time.perf_counter()
                    # the SDK's request path (auth headers, error mapping, timeouts) without its per-call
                    # param transform / pydantic parse, which cost ~1 ms of CPU per call (see the benchmark)
                    raw = await st.oai.post("/chat/completions", body=body, cast_to=bytes)
                latency = time.perf_counter() - t0
            except openai.APIError as exc:
                retryable, retry_after = _classify(exc)
                if not retryable or attempt >= s.max_retries:
                    self.stats.errors += 1
                    log.warning("LLM request %s failed: %s", key[:12], _describe(exc, attempt + 1))
                    return _error_response(key, _describe(exc, attempt + 1), time.perf_counter() - t0)
                cap = min(s.backoff_max_s, s.backoff_base_s * (2**attempt))
                delay = min(retry_after, s.backoff_max_s) if retry_after is not None else random.uniform(0, cap)
                attempt += 1
                self.stats.retries += 1
                log.debug("LLM request %s: %s; retry %d in %.2f s", key[:12], type(exc).__name__, attempt, delay)
                await asyncio.sleep(delay)
                continue
            try:
                resp = parse_completion(key, json.loads(raw), latency, want_logprobs)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.stats.errors += 1
                return _error_response(key, f"unparsable response: {type(exc).__name__}: {exc}", latency)
            self.stats.tokens_in += resp.tokens_in
            self.stats.tokens_out += resp.tokens_out
            return resp

    async def _retrying(self, what: str, factory: Callable[[], Awaitable[Any]]) -> Any:
        """Batch-API housekeeping calls with the same retry policy; raises when it gives up."""
        s = self.settings
        attempt = 0
        while True:
            try:
                return await factory()
            except openai.APIError as exc:
                retryable, retry_after = _classify(exc)
                if not retryable or attempt >= s.max_retries:
                    raise
                cap = min(s.backoff_max_s, s.backoff_base_s * (2**attempt))
                delay = min(retry_after, s.backoff_max_s) if retry_after is not None else random.uniform(0, cap)
                attempt += 1
                self.stats.retries += 1
                log.info("%s: %s; retry %d in %.2f s", what, type(exc).__name__, attempt, delay)
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------------------ batch
    async def _run_batch(
        self, todo: list[tuple[str, LLMRequest]], progress, n_hits: int, label: str
    ) -> dict[str, LLMResponse]:
        """Batch API path. Misses that belong to a non-terminal job recorded in ``llm_batches`` are polled,
        not resubmitted; the rest is submitted in chunks; every successful output line is cached at once."""
        st = self._loop_state()
        s = self.settings
        wanted = dict(todo)

        def say(msg: str) -> None:
            if progress is not None:
                progress(f"{label} batch: {msg}")

        # resume: jobs submitted by an earlier (interrupted) run that hold some of our keys
        active, in_flight = self._resume_jobs(wanted.keys(), say)
        fresh = [k for k, _ in todo if k not in in_flight]
        lines = ((k, batch_line(s, k, wanted[k])) for k in fresh)
        for keys, payload in chunk_batch_lines(lines, s.batch_chunk_size, s.batch_chunk_bytes):
            active[await self._submit_job(st, keys, payload, say)] = tuple(keys)

        out: dict[str, LLMResponse] = {}
        errors: dict[str, str] = {}
        await self._wait_jobs(st, active, wanted, out, errors, say)

        results: dict[str, LLMResponse] = {}
        for k, _ in todo:
            if k in out:
                results[k] = out[k]
            else:
                self.stats.errors += 1
                results[k] = _error_response(k, errors.get(k, "no result for this request in the batch output"))
        return results

    def _resume_jobs(self, wanted_keys, say) -> tuple[dict[str, tuple[str, ...]], set[str]]:
        """Jobs recorded in ``llm_batches`` by an earlier (interrupted) run, not terminal yet, that hold any of
        ``wanted_keys``: {batch_id: keys}, and the set of wanted keys they hold (polled, never resubmitted)."""
        active: dict[str, tuple[str, ...]] = {}
        in_flight: set[str] = set()
        wanted_keys = wanted_keys if isinstance(wanted_keys, (set, frozenset, dict)) else set(wanted_keys)
        for rec in self.cache.batches(open_only=True):
            mine = [k for k in rec.keys if k in wanted_keys]
            if mine:
                active[rec.batch_id] = rec.keys
                in_flight.update(mine)
                if rec.batch_id not in self.batch_jobs:
                    self.batch_jobs[rec.batch_id] = BatchJob(
                        rec.batch_id, len(rec.keys), None, rec.status, False, time.perf_counter()
                    )
                    self.stats.batches_resumed += 1
        if active:
            say(f"resuming {len(active)} pending job(s) holding {len(in_flight)} request(s)")
        return active, in_flight

    def _spool_path(self, file_id: str) -> Path | None:
        """Where a prefetched job's input file (by its file id) is kept until the job's answers are saved (beside
        the cache file, so a resumed run finds it too); None for an in-memory cache (kept in memory then)."""
        if self.cache.path == ":memory:":
            return None
        return Path(self.cache.path + ".batch_inputs") / f"{file_id}.jsonl"

    def _spool(self, file_id: str, payload: bytes) -> None:
        path = self._spool_path(file_id)
        if path is None:
            self._spool_mem[file_id] = payload
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)

    def _spooled_bodies(self, file_id: str | None) -> dict[str, dict]:
        """custom_id -> request body of a spooled input file ({} when it was not spooled here)."""
        if not file_id:
            return {}
        path = self._spool_path(file_id)
        if path is None:
            data = self._spool_mem.get(file_id, b"")
        else:
            data = path.read_bytes() if path.exists() else b""
        out = {}
        for line in data.splitlines():
            if line.strip():
                obj = json.loads(line)
                out[obj["custom_id"]] = obj.get("body")
        return out

    def _unspool(self, file_id: str | None) -> None:
        if not file_id:
            return
        path = self._spool_path(file_id)
        if path is None:
            self._spool_mem.pop(file_id, None)
        elif path.exists():
            path.unlink()

    async def _submit_job(
        self, st: _LoopState, keys: Sequence[str], payload: bytes, say, *, spool: bool = False
    ) -> str:
        """Upload one input file, create its job, record it in ``llm_batches`` (before anything else can
        interrupt: a rerun then polls it instead of submitting it again). Returns the batch id."""
        s = self.settings
        fobj = await self._retrying(
            "upload batch input",
            lambda: st.oai.files.create(file=("batch_input.jsonl", payload, "application/jsonl"), purpose="batch"),
        )
        if spool:  # before the job exists: nothing slow may stand between creating a job and recording it
            self._spool(fobj.id, payload)
        batch = await self._retrying(
            "create batch",
            lambda: st.oai.batches.create(
                input_file_id=fobj.id, endpoint=BATCH_ENDPOINT, completion_window=s.batch_completion_window
            ),
        )
        self.cache.record_batch(batch.id, fobj.id, batch.status or "validating", keys)
        self.batch_jobs[batch.id] = BatchJob(
            batch.id, len(keys), len(payload), batch.status or "validating", True, time.perf_counter()
        )
        self.stats.batches_submitted += 1
        self.stats.calls_made += len(keys)
        say(f"submitted job {batch.id} with {len(keys):,} request(s), {len(payload) / 1e6:.1f} MB")
        return batch.id

    async def _wait_jobs(
        self,
        st: _LoopState,
        active: dict[str, tuple[str, ...]],
        wanted: dict[str, LLMRequest | _Submitted],
        out: dict[str, LLMResponse] | None,
        errors: dict[str, str],
        say,
    ) -> int:
        """Poll ``active`` jobs until each is terminal; save every answer in the cache (and in ``out`` when given).
        Logs one line per job state change and a summary per poll round. Returns the answers saved."""
        s = self.settings
        last_status: dict[str, str] = {}
        saved_total = 0
        while active:
            for batch_id in list(active):
                batch = await self._retrying(
                    f"poll batch {batch_id}", lambda batch_id=batch_id: st.oai.batches.retrieve(batch_id)
                )
                status = batch.status
                job = self.batch_jobs.get(batch_id)
                if job is not None:
                    job.status = status
                    job.seconds = time.perf_counter() - job.t0
                if status in TERMINAL_BATCH_STATUSES:
                    n = await self._collect_batch(st, batch, active[batch_id], wanted, out, errors)
                    saved_total += n
                    self.cache.update_batch(
                        batch_id, status, output_file_id=batch.output_file_id, error_file_id=batch.error_file_id
                    )
                    del active[batch_id]
                    self._unspool(getattr(batch, "input_file_id", None))  # its answers are in the cache now
                    if job is not None:
                        job.answers = n
                    say(f"job {batch_id} {status}: {n:,} answer(s) saved")
                elif last_status.get(batch_id) != status:
                    self.cache.update_batch(batch_id, status)
                    last_status[batch_id] = status
                    counts = getattr(batch, "request_counts", None)
                    done = f" ({counts.completed:,}/{counts.total:,} done)" if counts is not None else ""
                    say(f"job {batch_id} {status}{done}")
            if active:
                say(
                    f"{len(active)} job(s) pending, {saved_total:,} answer(s) saved so far; "
                    f"next poll in {s.batch_poll_s:g} s"
                )
                await asyncio.sleep(s.batch_poll_s)
        return saved_total

    def batch_prefetch(
        self, request_batches: Iterable[Sequence[LLMRequest]], progress: Callable[[str], None] | None = None
    ) -> dict[str, int]:
        """Batch mode over a whole dataset: submit every request of ``request_batches`` (an iterable of request
        lists, consumed lazily: one chunk's lines are held in memory at a time) that is neither cached nor held by
        an open job of an earlier run, in jobs of at most ``batch_chunk_size`` requests / ``batch_chunk_bytes``
        bytes; then wait for all jobs (resumed ones included) and save their answers in the cache. A following
        :meth:`complete_many` over the same requests then finds them cached. Returns counts: requests seen,
        cached, resumed, submitted, jobs submitted, answers saved."""

        async def run() -> dict[str, int]:
            st = self._loop_state()
            s = self.settings
            label = f"llm[{s.model}] batch"

            def say(msg: str) -> None:
                if progress is not None:
                    progress(f"{label}: {msg}")
                else:
                    log.info("%s: %s", label, msg)

            open_jobs = self.cache.batches(open_only=True)
            open_keys = {k: rec.batch_id for rec in open_jobs for k in rec.keys}
            resumed: dict[str, tuple[str, ...]] = {}
            seen: set[str] = set()
            counts = {"requests": 0, "cached": 0, "resumed": 0, "submitted": 0, "jobs_submitted": 0, "answers": 0}
            wanted: dict[str, _Submitted] = {}  # what is submitted now or resumed, without its messages
            chunker = BatchChunker(s.batch_chunk_size, s.batch_chunk_bytes)
            active: dict[str, tuple[str, ...]] = {}

            async def submit(done) -> None:
                keys, payload = done
                active[await self._submit_job(st, keys, payload, say, spool=True)] = tuple(keys)
                counts["jobs_submitted"] += 1

            for reqs in request_batches:
                keyed = {}
                for r in reqs:
                    k = request_key(s, r)
                    if k not in seen:
                        seen.add(k)
                        keyed[k] = r
                counts["requests"] += len(keyed)
                cached = self.cache.has_many(keyed)
                counts["cached"] += len(cached)
                for k, r in keyed.items():
                    if k in cached:
                        continue
                    wanted[k] = _Submitted(r.prompt_version, r.top_logprobs is not None)
                    if k in open_keys:
                        bid = open_keys[k]
                        if bid not in resumed:
                            rec = next(x for x in open_jobs if x.batch_id == bid)
                            resumed[bid] = rec.keys
                        counts["resumed"] += 1
                        continue
                    counts["submitted"] += 1
                    done = chunker.add(k, batch_line(s, k, r))
                    if done is not None:
                        await submit(done)
            last = chunker.flush()
            if last is not None:
                await submit(last)
            for bid, keys in resumed.items():
                rec = next(x for x in open_jobs if x.batch_id == bid)
                if bid not in self.batch_jobs:
                    self.batch_jobs[bid] = BatchJob(bid, len(keys), None, rec.status, False, time.perf_counter())
                    self.stats.batches_resumed += 1
                active[bid] = keys
            if resumed:
                say(f"resuming {len(resumed)} pending job(s) of an earlier run ({counts['resumed']:,} request(s))")
            say(
                f"{counts['requests']:,} request(s): {counts['cached']:,} cached, {counts['resumed']:,} in resumed "
                f"jobs, {counts['submitted']:,} submitted in {counts['jobs_submitted']} job(s)"
            )
            errors: dict[str, str] = {}
            counts["answers"] = await self._wait_jobs(st, active, wanted, None, errors, say)
            if errors:
                say(f"{len(errors):,} request(s) without an answer (asked again online by the judging pass)")
            return counts

        return self._run_sync(run())

    async def _collect_batch(
        self,
        st: _LoopState,
        batch: Any,
        batch_keys: Sequence[str],
        wanted: dict[str, LLMRequest | _Submitted],
        out: dict[str, LLMResponse] | None,
        errors: dict[str, str],
    ) -> int:
        """Download a terminal job's output and error files; cache every answer (``out``: also return them)."""
        s = self.settings
        got: set[str] = set()
        spooled = None if out is not None else self._spooled_bodies(getattr(batch, "input_file_id", None))
        saved = 0
        for file_id, is_error_file in ((batch.output_file_id, False), (batch.error_file_id, True)):
            if not file_id:
                continue
            content = await self._retrying(f"download {file_id}", lambda file_id=file_id: st.oai.files.content(file_id))
            rows = []
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    log.warning("batch %s: unparsable output line skipped", batch.id)
                    continue
                key = obj.get("custom_id")
                if not key:
                    continue
                response = obj.get("response") or {}
                body = response.get("body")
                if obj.get("error") is None and response.get("status_code") == 200 and isinstance(body, dict):
                    req = wanted.get(key)
                    if isinstance(req, LLMRequest):
                        want_lp, request_body = req.top_logprobs is not None, build_body(s, req)
                    elif req is not None:
                        want_lp, request_body = req.want_logprobs, (spooled or {}).get(key)
                    else:
                        want_lp, request_body = True, None
                    try:
                        resp = parse_completion(key, body, 0.0, want_lp)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        errors[key] = f"unparsable batch answer: {exc}"
                        continue
                    self.stats.tokens_in += resp.tokens_in
                    self.stats.tokens_out += resp.tokens_out
                    got.add(key)
                    if req is not None:
                        if out is not None:
                            out[key] = resp
                        rows.append(CacheRow(resp, s.model, req.prompt_version, request_body))
                    else:  # belongs to an earlier run's request set: keep the answer, request unknown here
                        rows.append(CacheRow(resp, s.model, None, None))
                else:
                    err = obj.get("error") or (body or {}).get("error") or {}
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                    errors[key] = (
                        f"batch {batch.id} ({'error file' if is_error_file else 'output'}): "
                        f"HTTP {response.get('status_code')}: {msg}"
                    )
            saved += self.cache.put_many(rows)
        if batch.status != "completed":
            detail = ""
            errs = getattr(batch, "errors", None)
            if errs is not None and getattr(errs, "data", None):
                detail = "; ".join(f"{e.code}: {e.message}" for e in errs.data if e is not None)
            for key in batch_keys:
                if key not in got:
                    errors.setdefault(
                        key,
                        f"batch {batch.id} {batch.status} without an answer for this request"
                        + (f" ({detail})" if detail else ""),
                    )
        return saved
