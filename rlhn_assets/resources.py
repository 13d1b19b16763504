"""Dagster resources of the project, in one place. They are bound in ``defs/resources.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Literal

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field, model_validator

from rlhn_assets import settings
from rlhn_assets.lib.db import connect
from rlhn_assets.lib.schema import apply_schema
from rlhn_assets.registry import Registry, load_registry


class RLHNDuckDB(DuckDBResource):
    """dagster-duckdb's resource, with a connection that is always closed (upstream leaks it on an
    exception) and a longer lock wait (``lib.db.open_with_lock_retry``: capped back-off up to
    ``RLHN_DUCKDB_LOCK_TIMEOUT_S``, default 600 s, logged to the run), so a run waiting on another run's short
    write never fails. Opening the file applies the pipeline schema (``lib/schema.py``), so every stage finds
    every table."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with connect(
            self.database,
            config={"custom_user_agent": "dagster", **self.connection_config},
            log=dg.get_dagster_logger(),
        ) as conn:
            apply_schema(conn)  # every table, at the current schema version (one query when it is there)
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


class BaseModelsResource(dg.ConfigurableResource):
    """The base models every stage that encodes reads (training, evaluation, mining, the dataset-pruning study), and
    the device they run on. Bound in ``defs/resources.py`` from RLHN_RETRIEVER_BASE, RLHN_RERANKER_BASE,
    RLHN_QUERY_PROMPT, RLHN_PASSAGE_PROMPT and RLHN_DEVICE (lib/base_models.ENV); every field can be changed for one
    run in the launchpad (``resources: {base_models: {config: {...}}}``).

    ``retriever`` / ``reranker``: a local folder or a hub id (resolved to its snapshot in the local Hugging Face
    cache, downloaded once when online); "" = the packaged all-MiniLM-L6-v2 for the retriever, the retriever's base
    for the reranker. ``query_prompt`` / ``passage_prompt``: None keeps the retriever's own prompts (its
    config_sentence_transformers.json), a string overrides them ("" = none). ``device``: auto (CUDA, then MPS, then
    CPU) or a torch device. The base's content hash and the prompts are part of every trained model's identity
    (lib/base_models.EncoderBase.identity); the observable sources ``retriever_base_model`` / ``reranker_base_model``
    carry them into the asset graph's lineage."""

    retriever: str = ""
    reranker: str = ""
    query_prompt: str | None = None
    passage_prompt: str | None = None
    device: str = "auto"

    @model_validator(mode="after")
    def _check_device(self):
        if self.device.strip() != "auto":
            from rlhn_assets.lib.embeddings import resolve_device

            resolve_device(self.device)  # raises on a device string torch would not know
        return self

    def retriever_base(self):
        """The retriever's lib/base_models.EncoderBase (folder, prompts, identity)."""
        from rlhn_assets.lib.base_models import resolve_base

        return resolve_base(self.retriever, self.query_prompt, self.passage_prompt)

    def reranker_base(self):
        """The reranker's EncoderBase: its own folder, or the retriever's; a cross-encoder takes no prompts."""
        from rlhn_assets.lib.base_models import resolve_base

        return resolve_base(self.reranker or self.retriever).without_prompts()

    def resolved_device(self) -> str:
        from rlhn_assets.lib.embeddings import resolve_device

        return resolve_device(self.device)


class JudgingBudgetResource(dg.ConfigurableResource):
    """What paid judging may cost before the budget gate stops it (lib/judging/budget.py). USD, compared with
    the ``judging_cost_estimate`` of the paid tiers. The default 0 blocks every paid call until someone raises
    it; local and embedding tiers cost nothing and are never blocked."""

    max_usd_per_dataset: float = Field(default=0.0, ge=0.0)
    max_usd_per_run: float = Field(default=0.0, ge=0.0)
    # compare the `max` estimate (every call writes max_tokens) or the `typical` one (500 output tokens per
    # listwise call)
    basis: Literal["max", "typical"] = "max"


# judge kinds that make one call per negative and read one answer token's logprobs
ONE_TOKEN_KINDS = ("pointwise", "graded")
JudgeKind = Literal["listwise", "pointwise", "graded", "embedding_margin"]
# the one-negative-per-call prompt families of each kind ("" = the kind's default); kept in step with
# lib/judging/prompts.py by test_judge_settings.py
ONE_TOKEN_PROMPTS = {"pointwise": ("pointwise-v1", "plain-v1"), "graded": ("graded-ref-v1", "graded-v1")}
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


class JudgeTierResource(dg.ConfigurableResource):
    """One tier of the judge cascade: which kind of judge, and the OpenAI-compatible endpoint it calls.

    ``kind``: ``listwise`` (the paper's prompt), ``pointwise`` (yes/no logprobs), ``graded`` (0-3 grade, score =
    expected grade from the logprobs) or ``embedding_margin`` (no LLM). ``pointwise_prompt`` picks the prompt
    family of the one-negative-per-call kinds (empty = the kind's default: ``pointwise-v1`` / ``graded-ref-v1``).
    LLM kinds go through the one ``openai`` client path (``rlhn_assets.lib.llm.client``); the API
    key is read from the environment variable named by ``api_key_env`` and never logged or stored.
    ``local_model`` (e.g. ``qwen2.5-coder-0.5b``) makes the step start a llama.cpp server on 127.0.0.1
    with that packaged model, health-check it, and stop it afterwards; ``base_url`` is then ignored.

    Every setting is typed (``Literal`` choices, ranges) and cross-checked when the resource is built, so a
    wrong value fails when the definitions load or the run is launched - never after a server has started."""

    tier: int = Field(default=1, ge=1, le=2)
    kind: JudgeKind = "listwise"
    # listwise prompt (datasets with `prompt: scidocsrr` in the registry use theirs whatever this says)
    prompt_family: Literal["tier1", "tier2", "scidocsrr"] = "tier1"
    pointwise_prompt: Literal["", "pointwise-v1", "plain-v1", "graded-ref-v1", "graded-v1"] = ""
    # pointwise/graded: a calibration artifact (lib/judging/calibration.py; path relative to the data directory).
    # When set, the thresholds apply to the calibrated P(relevant), and its version is recorded with each verdict.
    calibration: str = ""
    # endpoint
    model: str = "gpt-4o-mini"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(default=0.1, ge=0.0, le=2.0)
    max_tokens: int = Field(default=2048, ge=1)
    # listwise: ask for the verdict as structured output (the endpoint constrains the answer to the verdict's
    # JSON schema; it is still validated here): json_schema (OpenAI, vLLM, llama-server), json_object_schema
    # (llama-cpp-python's server) or none (the paper's <verdict> tags). One-token kinds read logprobs and ignore it.
    response_format_style: Literal["json_schema", "json_object_schema", "none"] = "none"
    concurrency: int = Field(default=8, ge=1)
    max_retries: int = Field(default=5, ge=0)
    timeout_s: float = Field(default=120.0, gt=0)
    mode: Literal["online", "batch"] = "online"  # batch: OpenAI Batch API, half price
    # batch mode: one job per at most this many requests / bytes of input file (OpenAI's limits: 50,000 / 200 MB).
    # Lower them for a provider that drops rows of large jobs (the RLHN authors saw that on Azure), to stay under
    # the enqueued-token limit of your organisation, or for earlier partial results (lib/llm/client.py).
    batch_chunk_size: int = Field(default=50_000, ge=1, le=50_000)
    batch_chunk_bytes: int = Field(default=190_000_000, ge=1, le=200_000_000)
    batch_poll_s: float = Field(default=60.0, gt=0)
    local_model: str = ""
    local_parallel: int = Field(default=1, ge=1)
    local_ctx_size: int = Field(default=4096, ge=512)
    # judge settings
    max_parse_retries: int = Field(default=2, ge=0)
    threshold_relevant: float = 0.5  # range depends on the kind's score (checked below)
    threshold_better: float = 0.9
    margin: float = Field(default=0.05, ge=0.0, lt=1.0)
    # cost per 1M tokens (USD), for metadata, the estimate and the budget gate (judging_cost_estimate)
    price_in_per_m: float = Field(default=0.0, ge=0.0)
    price_out_per_m: float = Field(default=0.0, ge=0.0)
    # Does this endpoint cost money? None = decide from the endpoint: a local model, 127.0.0.1/localhost or the
    # embedding judge are free, anything else (api.openai.com, a remote base_url) is paid. Set false for your
    # own remote vLLM you do not pay per token for. Paid tiers are gated by the judging budget and are not
    # re-materialized automatically unless RLHN_AUTOMATE_PAID_JUDGING=1.
    paid: bool | None = None
    cache_path: str = ""
    # Tier 2 only: re-judge every negative of a forwarded instance ("instance", the paper) or only the negatives
    # tier 1 flagged or failed on ("flagged_negatives": tier 2 confirms or rejects tier 1's flags; far fewer calls
    # for a one-call-per-negative judge). Unflagged negatives then keep tier 1's not_relevant.
    scope: Literal["instance", "flagged_negatives"] = "instance"
    # asset check: share of `error` verdicts above which the tier's partition fails
    max_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _settings_fit_the_kind(self):
        if (
            self.pointwise_prompt
            and self.kind in ONE_TOKEN_KINDS
            and self.pointwise_prompt not in ONE_TOKEN_PROMPTS[self.kind]
        ):
            raise ValueError(
                f"pointwise_prompt {self.pointwise_prompt!r} is not a {self.kind} prompt; "
                f"allowed for kind {self.kind!r}: {ONE_TOKEN_PROMPTS[self.kind]} (or '' for the default)"
            )
        if self.kind in ONE_TOKEN_KINDS:
            hi = 3.0 if self.kind == "graded" and not self.calibration else 1.0
            what = "the expected grade (0-3)" if hi == 3.0 else "a probability (0-1)"
            for name in ("threshold_relevant", "threshold_better"):
                v = getattr(self, name)
                if not 0.0 <= v <= hi:
                    raise ValueError(
                        f"{name} = {v} is outside 0..{hi:g}: a {self.kind} judge"
                        f"{' with a calibration' if self.calibration else ''} thresholds {what}"
                    )
            if self.threshold_better < self.threshold_relevant:
                raise ValueError(
                    f"threshold_better ({self.threshold_better}) must be >= threshold_relevant "
                    f"({self.threshold_relevant}): `better` is the stronger verdict"
                )
        if self.pointwise_prompt and self.kind not in ONE_TOKEN_KINDS:
            raise ValueError(
                f"pointwise_prompt applies to the {ONE_TOKEN_KINDS} kinds; a {self.kind!r} judge "
                "would ignore it (listwise: prompt_family)"
            )
        if self.scope != "instance" and self.tier != 2:
            raise ValueError(f"scope {self.scope!r} applies to tier 2 only (tier 1 judges every negative)")
        if self.calibration and self.kind not in ONE_TOKEN_KINDS:
            raise ValueError(f"calibration applies to the {ONE_TOKEN_KINDS} kinds, not {self.kind!r}")
        if self.mode == "batch" and self.local_model:
            raise ValueError("mode 'batch' is the OpenAI Batch API; a local_model tier runs online")
        return self

    @property
    def is_paid(self) -> bool:
        """Whether judging with this tier costs money (see ``paid``)."""
        if self.paid is not None:
            return self.paid
        if self.kind == "embedding_margin" or self.local_model:
            return False
        if not self.base_url:
            return True  # api.openai.com
        from urllib.parse import urlparse

        return (urlparse(self.base_url).hostname or "") not in _LOCAL_HOSTS

    @property
    def endpoint(self) -> str:
        return (
            "local llama.cpp (" + self.local_model + ")"
            if self.local_model
            else (self.base_url or "https://api.openai.com/v1")
        )

    def describe(self) -> dict:
        """What the metadata shows about this tier (never the key)."""
        d = {"tier": self.tier, "kind": self.kind}
        if self.kind != "embedding_margin":
            d |= {"model": self.model, "endpoint": self.endpoint, "mode": self.mode, "paid": self.is_paid}
            if self.mode == "batch":
                d |= {"batch_chunk_size": self.batch_chunk_size, "batch_chunk_bytes": self.batch_chunk_bytes}
            if self.kind == "listwise":
                d |= {"prompt_family": self.prompt_family, "response_format_style": self.response_format_style}
        if self.kind == "embedding_margin":
            d["margin"] = self.margin
        if self.tier == 2:
            d["scope"] = self.scope
        if self.kind in ONE_TOKEN_KINDS:
            d |= {
                "threshold_relevant": self.threshold_relevant,
                "threshold_better": self.threshold_better,
                "prompt_family": self.one_token_judge_class().default_family
                if not self.pointwise_prompt
                else self.pointwise_prompt,
            }
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

    def endpoint_settings(self, base_url: str | None = None, model_identity: str | None = None):
        from rlhn_assets.lib.llm.client import EndpointSettings

        return EndpointSettings(
            model=self.model,
            base_url=base_url or self.base_url or None,
            model_identity=model_identity,
            api_key_env=self.api_key_env,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            response_format_style=self.response_format_style,
            concurrency=self.concurrency,
            max_retries=self.max_retries,
            timeout_s=self.timeout_s,
            mode=self.mode,
            batch_chunk_size=self.batch_chunk_size,
            batch_chunk_bytes=self.batch_chunk_bytes,
            batch_poll_s=self.batch_poll_s,
        )

    def cost_usd(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in / 1e6 * self.price_in_per_m + tokens_out / 1e6 * self.price_out_per_m

    def make_client(self, cache, base_url: str | None, model_identity: str | None = None):
        from rlhn_assets.lib.llm.client import LLMClient

        return LLMClient(
            self.endpoint_settings(base_url, model_identity),
            cache,
            api_key="local" if self.local_model else None,
            keep_loop=True,  # one HTTP client for the whole step; open_judge closes it
        )

    @property
    def shared_cache_path(self) -> str:
        """The LLM response cache file every judging run shares (``cache_path``, default data/llm_cache.duckdb)."""
        return self.cache_path or str(settings.data_dir() / "llm_cache.duckdb")

    @contextmanager
    def open_judge(self, family_by_instance=None, log=None, cache=None):
        """Build the judge; for a local model, run the llama.cpp server for the duration. ``cache``: an open
        ResponseCache to use (a fanned-out shard's own file, lib/judging/shards.py) instead of the shared one."""
        from rlhn_assets.lib.judging import judges

        if self.kind == "embedding_margin":
            from rlhn_assets.lib.embeddings import base_model_path, dir_hash, load_model

            yield judges.EmbeddingMarginJudge(load_model(), dir_hash(base_model_path()), margin=self.margin)
            return
        from rlhn_assets.lib.llm.cache import ResponseCache

        server = None
        try:
            base_url = identity = None
            if self.local_model:
                from rlhn_assets.lib.local_llm import LlamaServer, assemble_gguf, model_sha256

                gguf = assemble_gguf(self.local_model)
                identity = f"gguf-sha256:{model_sha256(gguf)}"  # the alias is just a name
                server = LlamaServer(gguf, ctx_size=self.local_ctx_size, parallel=self.local_parallel, alias=self.model)
                if log:
                    log(f"starting llama.cpp server for {self.local_model} ({gguf.name})")
                server.start()
                base_url = server.base_url
                if log:
                    if len(server.attempts) > 1:
                        log(
                            f"llama.cpp server crashed on start ({server.attempts[0]['ended']}); running with "
                            f"{' '.join(server.settings_args)} instead (recorded for the next start)"
                        )
                    log(
                        f"llama.cpp server healthy at {base_url} ({server.binary()}"
                        f"{' ' + ' '.join(server.settings_args) if server.settings_args else ''})"
                    )
            with (
                contextlib.nullcontext(cache) if cache is not None else ResponseCache(self.shared_cache_path) as c,
                closing(self.make_client(c, base_url, identity)) as client,
            ):
                if self.kind == "listwise":
                    yield judges.ListwiseLLMJudge(
                        client,
                        self.prompt_family,
                        max_parse_retries=self.max_parse_retries,
                        family_by_instance=family_by_instance,
                    )
                elif self.calibration:
                    from rlhn_assets.lib.embeddings import load_model
                    from rlhn_assets.lib.judging.calibration import CalibratedJudge

                    inner = self.one_token_judge_class()(
                        client, max_parse_retries=self.max_parse_retries, family=self.pointwise_prompt or None
                    )
                    yield CalibratedJudge(
                        inner,
                        load_model(),
                        self.load_calibrator(),
                        threshold_relevant=self.threshold_relevant,
                        threshold_better=self.threshold_better,
                    )
                else:
                    yield self.one_token_judge_class()(
                        client,
                        threshold_relevant=self.threshold_relevant,
                        threshold_better=self.threshold_better,
                        max_parse_retries=self.max_parse_retries,
                        family=self.pointwise_prompt or None,
                    )
        finally:
            if server is not None:
                server.stop()
