"""Types and constants shared by the LLM client (``client.py``) and its response cache (``cache.py``).

They live here so that neither of the two imports the other for them: ``cache`` needs the response type,
``client`` builds cache rows and reads batch states, and a cycle between the two works only as long as every
such import stays late (tested by ``rlhn_assets_tests/test_import_graph.py``). Plain module: stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass

# OpenAI Batch API job states after which a job changes no more (its output, if any, can be read)
TERMINAL_BATCH_STATUSES = frozenset({"completed", "expired", "cancelled", "failed"})


@dataclass
class LLMResponse:
    key: str
    text: str | None
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    latency_s: float
    top_logprobs: list[list[tuple[str, float]]] | None  # per generated token: [(token, logprob), ...]
    cached: bool  # served from the cache (no call made now)
    error: str | None = None  # the call failed after all retries (never cached)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class CacheRow:
    """What ``ResponseCache.put_many`` stores: a successful response plus the request that produced it."""

    response: LLMResponse
    model: str
    prompt_version: str
    request: dict  # the request body as sent (never contains credentials)
