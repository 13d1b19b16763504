"""Dagster resources of the project, in one place. They are bound in ``defs/resources.py``."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from rlhn_assets import settings
from rlhn_assets.lib.db import connect, ensure_schema
from rlhn_assets.registry import Registry, load_registry


class RLHNDuckDB(DuckDBResource):
    """dagster-duckdb's resource, with a connection that is always closed (upstream leaks it on an
    exception) and a longer lock wait (``lib.db.open_with_lock_retry``: capped back-off up to
    ``RLHN_DUCKDB_LOCK_TIMEOUT_S``, default 600 s, logged to the run), so a run waiting on another run's short
    write never fails."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with connect(self.database, config={"custom_user_agent": "dagster", **self.connection_config},
                     log=dg.get_dagster_logger()) as conn:
            ensure_schema(conn)
            yield conn


class DatasetRegistryResource(dg.ConfigurableResource):
    """The source-dataset registry (``data/datasets.yaml``). Partitions come from the default registry at
    load time; this resource resolves the files of a partition at run time (tests point it elsewhere)."""

    path: str = ""

    def load(self) -> Registry:
        return load_registry(Path(self.path) if self.path else settings.registry_path())

    @property
    def data_dir(self) -> Path:
        return self.load().data_dir


# judge kinds that make one call per negative and read one answer token's logprobs
ONE_TOKEN_KINDS = ("pointwise", "graded")


class JudgeTierResource(dg.ConfigurableResource):
    """One tier of the judge cascade: which kind of judge, and the OpenAI-compatible endpoint it calls.

    ``kind``: ``listwise`` (the paper's prompt), ``pointwise`` (yes/no logprobs), ``graded`` (0-3 grade, score =
    expected grade from the logprobs) or ``embedding_margin`` (no LLM). ``pointwise_prompt`` picks the prompt
    family of the one-negative-per-call kinds (empty = the kind's default: ``pointwise-v1`` / ``graded-ref-v1``). LLM kinds go through the one ``openai`` client path (``rlhn_assets.lib.llm.client``); the API
    key is read from the environment variable named by ``api_key_env`` and never logged or stored.
    ``local_model`` (e.g. ``qwen2.5-coder-0.5b``) makes the step start a llama.cpp server on 127.0.0.1
    with that packaged model, health-check it, and stop it afterwards; ``base_url`` is then ignored."""

    tier: int = 1
    kind: str = "listwise"
    prompt_family: str = "tier1"  # listwise prompt: tier1 | tier2 (datasets with prompt: scidocsrr use theirs)
    pointwise_prompt: str = ""  # pointwise: pointwise-v1 | plain-v1; graded: graded-ref-v1 | graded-v1
    # pointwise/graded: a calibration artifact (lib/judging/calibration.py; path relative to the data directory).
    # When set, the thresholds apply to the calibrated P(relevant), and its version is recorded with each verdict.
    calibration: str = ""
    # endpoint
    model: str = "gpt-4o-mini"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.1
    max_tokens: int = 2048
    response_format_style: str = "none"
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0
    mode: str = "online"  # online | batch (OpenAI Batch API, half price)
    local_model: str = ""
    local_parallel: int = 1
    local_ctx_size: int = 4096
    # judge settings
    max_parse_retries: int = 2
    threshold_relevant: float = 0.5
    threshold_better: float = 0.9
    margin: float = 0.05
    # cost per 1M tokens (USD), for metadata and the dry-run estimate
    price_in_per_m: float = 0.0
    price_out_per_m: float = 0.0
    cache_path: str = ""
    # Tier 2 only: re-judge every negative of a forwarded instance ("instance", the paper) or only the negatives
    # tier 1 flagged or failed on ("flagged_negatives": tier 2 confirms or rejects tier 1's flags; far fewer calls
    # for a one-call-per-negative judge). Unflagged negatives then keep tier 1's not_relevant.
    scope: str = "instance"
    # asset check: share of `error` verdicts above which the tier's partition fails
    max_error_rate: float = 0.05

    def describe(self) -> dict:
        """What the metadata shows about this tier (never the key)."""
        d = {"tier": self.tier, "kind": self.kind}
        if self.kind != "embedding_margin":
            d |= {"model": self.model, "endpoint": "local llama.cpp (" + self.local_model + ")" if self.local_model
                  else (self.base_url or "api.openai.com"), "mode": self.mode, "prompt_family": self.prompt_family}
        if self.kind == "embedding_margin":
            d["margin"] = self.margin
        if self.tier == 2:
            d["scope"] = self.scope
        if self.kind in ONE_TOKEN_KINDS:
            d |= {"threshold_relevant": self.threshold_relevant, "threshold_better": self.threshold_better,
                  "prompt_family": self.one_token_judge_class().default_family if not self.pointwise_prompt
                  else self.pointwise_prompt}
            if self.calibration:
                d["calibration"] = self.calibration
        return d

    def load_calibrator(self):
        from rlhn_assets.lib.judging.calibration import Calibrator

        path = Path(self.calibration)
        return Calibrator.load(path if path.is_absolute() else settings.data_dir() / path)

    def one_token_judge_class(self):
        from rlhn_assets.lib.judging import judges

        return {"pointwise": judges.PointwiseLLMJudge, "graded": judges.GradedLLMJudge}[self.kind]

    def render_one(self, inst, neg) -> tuple[dict, ...]:
        """The messages of one call of a one-negative-per-call judge (for the cost estimate)."""
        cls = self.one_token_judge_class()
        return cls.render(self.pointwise_prompt or cls.default_family, inst, neg)

    def endpoint_settings(self, base_url: str | None = None):
        from rlhn_assets.lib.llm.client import EndpointSettings

        return EndpointSettings(
            model=self.model, base_url=base_url or self.base_url or None, api_key_env=self.api_key_env,
            temperature=self.temperature, max_tokens=self.max_tokens,
            response_format_style=self.response_format_style, concurrency=self.concurrency,
            max_retries=self.max_retries, timeout_s=self.timeout_s, mode=self.mode)

    def cost_usd(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in / 1e6 * self.price_in_per_m + tokens_out / 1e6 * self.price_out_per_m

    def make_client(self, cache, base_url: str | None):
        from rlhn_assets.lib.llm.client import LLMClient

        return LLMClient(self.endpoint_settings(base_url), cache, api_key="local" if self.local_model else None)

    @contextmanager
    def open_judge(self, family_by_instance=None, log=None):
        """Build the judge; for a local model, run the llama.cpp server for the duration."""
        from rlhn_assets.lib.judging import judges

        if self.kind == "embedding_margin":
            from rlhn_assets.lib.embeddings import base_model_path, dir_hash, load_model

            yield judges.EmbeddingMarginJudge(load_model(), dir_hash(base_model_path()), margin=self.margin)
            return
        if self.kind not in ("listwise", *ONE_TOKEN_KINDS):
            raise ValueError(f"judge kind must be listwise, pointwise, graded or embedding_margin, not {self.kind!r}")
        from rlhn_assets.lib.llm.cache import ResponseCache

        cache_path = self.cache_path or str(settings.data_dir() / "llm_cache.duckdb")
        server = None
        try:
            base_url = None
            if self.local_model:
                from rlhn_assets.lib.local_llm import LlamaServer, assemble_gguf

                gguf = assemble_gguf(self.local_model)
                server = LlamaServer(gguf, ctx_size=self.local_ctx_size, parallel=self.local_parallel,
                                     alias=self.model)
                if log:
                    log(f"starting llama.cpp server for {self.local_model} ({gguf.name})")
                server.start()
                base_url = server.base_url
                if log:
                    if len(server.attempts) > 1:
                        log(f"llama.cpp server crashed on start ({server.attempts[0]['ended']}); running with "
                            f"{' '.join(server.settings_args)} instead (recorded for the next start)")
                    log(f"llama.cpp server healthy at {base_url} ({server.binary()}"
                        f"{' ' + ' '.join(server.settings_args) if server.settings_args else ''})")
            with ResponseCache(cache_path) as cache:
                client = self.make_client(cache, base_url)
                if self.kind == "listwise":
                    yield judges.ListwiseLLMJudge(client, self.prompt_family, max_parse_retries=self.max_parse_retries,
                                                  family_by_instance=family_by_instance)
                elif self.calibration:
                    from rlhn_assets.lib.embeddings import load_model
                    from rlhn_assets.lib.judging.calibration import CalibratedJudge

                    inner = self.one_token_judge_class()(client, max_parse_retries=self.max_parse_retries,
                                                         family=self.pointwise_prompt or None)
                    yield CalibratedJudge(inner, load_model(), self.load_calibrator(),
                                          threshold_relevant=self.threshold_relevant,
                                          threshold_better=self.threshold_better)
                else:
                    yield self.one_token_judge_class()(client, threshold_relevant=self.threshold_relevant,
                                                       threshold_better=self.threshold_better,
                                                       max_parse_retries=self.max_parse_retries,
                                                       family=self.pointwise_prompt or None)
        finally:
            if server is not None:
                server.stop()
