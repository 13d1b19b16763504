"""Fine-tune a retriever (bi-encoder) and a reranker (cross-encoder) on one training-data variant.

The recipe follows the RLHN paper's training setup (Tevatron, InfoNCE with in-batch + hard negatives) at CPU scale:

* **Retriever**: the packaged all-MiniLM-L6-v2, contrastive InfoNCE with in-batch + hard negatives
  (sentence-transformers' ``MultipleNegativesRankingLoss``, MNRL), 1 positive + ``hard_negatives`` (paper: 7)
  hard negatives per query, lr 2e-5, linear warmup, ``BatchSamplers.NO_DUPLICATES`` so that no text appears
  twice in a batch (a duplicate would be an in-batch "negative" identical to a positive).
* **Reranker**: a ``CrossEncoder`` initialised from the same MiniLM weights (``num_labels=1``, new classifier
  head), ``BinaryCrossEntropyLoss`` on (query, passage, label) pairs: 1 sampled positive + ``reranker_negatives``
  hard negatives per query, ``pos_weight`` = negatives per positive so both classes weigh the same (the
  sentence-transformers MS MARCO BCE recipe). The paper's reranker recipe is not public.

Temperature vs scale: MNRL computes ``cross_entropy(scale * cos_sim)``; the paper's InfoNCE temperature 0.01
is ``scale = 100``. The default here is ``scale = 20`` (sentence-transformers' default for MNRL); the paper
used 0.01 with E5 and Qwen backbones, not MiniLM. Quick measurement (SciFact train with mined negatives,
20 steps x batch 16, 3 hard negatives, 96 tokens; nDCG@10 on the 300 SciFact test queries against a
983-abstract subsample of the corpus): base 0.7565, scale 20 -> 0.7607, scale 100 -> 0.7545. Small and
noisy, but scale 100 did not help MiniLM. Set ``scale=100`` to follow the paper literally.

How epochs work: the trainer runs ONE pass over pre-built rows that already hold every epoch. For each epoch
``e`` one positive per query is drawn with ``random.Random(seed * 1000 + e)``; that is how the extra
(relabeled) positives of the RLHN variant enter training — an instance with 3 positives trained for several
epochs sees several of them.

Determinism: everything is seeded (positive sampling, negative filling, batch order, classifier-head init,
dropout). On this CPU stack, the same data + settings give bit-identical weights, and the saved folder's
content hash (``data_version``) is reproducible (the model card's wall-clock "Training Time" line is
suppressed for that); a change in the training data changes it. Bit-identity holds for one machine and one
torch thread count: 1 vs 2 threads changed the loss in the 7th digit and the weights' bytes.

Base model, prompts, hardware: ``base`` (lib/base_models.EncoderBase) names the folder to start from and the
query / passage prompts; the trainer gets them as its ``prompts`` (column ``anchor`` -> query prompt, ``positive`` and
``negative_*`` -> passage prompt) and the saved model keeps them in its config, so evaluating it applies the same ones.
``device`` is resolved by lib/embeddings.resolve_device (CUDA, then MPS, then CPU) and the Hugging Face trainer
places the model; ``precision`` picks bf16 / fp16 mixed precision; ``loss: cached_mnrl`` is GradCache
(``CachedMultipleNegativesRankingLoss``: the same loss in ``mini_batch_size`` chunks, so a large batch of in-batch
negatives fits in memory) and ``gradient_checkpointing`` trades compute for activation memory.

Several processes (DDP): started by ``torchrun`` (lib/train_cli.py), each process trains on its share of every batch
(``batch_size`` stays the global batch: ``batch_size / processes`` per process) and MNRL gathers the embeddings of all
processes, so every query still sees ``batch_size`` in-batch passages; only rank 0 saves the model.

Heavy imports (torch, transformers, sentence-transformers, datasets) happen inside the functions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhn_assets.lib.embeddings import dir_hash, resolve_device, resolve_precision

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1  # passed to transformers as warmup_steps=<float> (a float < 1 is a ratio)
    hard_negatives: int = 7  # per query, as in the paper; fewer available -> see retriever_rows
    # MNRL scale = 1 / temperature. Paper: temperature 0.01 = scale 100. Default 20 = sentence-transformers'
    # default; scale 100 did not help MiniLM in a quick SciFact measurement (module docstring).
    scale: float = 20.0
    max_seq_length: int | None = 256  # None = the base model's own
    seed: int = 13
    max_steps: int = -1  # cap for demos/tests (-1 = no cap)
    reranker_negatives: int = 3  # hard negatives per query for the cross-encoder pairs
    # torch intra-op threads while training (0 = leave torch's default, = the core count); restored afterwards.
    # On the 2-core box under heavy load from other jobs, 1 thread halved the CPU time of tiny steps (the test
    # suite) but made full-size steps slower in wall time (less CPU share). Keep 0 unless measured otherwise.
    # Runs are reproducible per thread count; a different count may change the weights' last bits.
    torch_threads: int = 0
    # "auto" = bf16 mixed precision (transformers' `bf16=True`: autocast, fp32 master weights) where the hardware
    # has native bf16 (lib/embeddings.resolve_precision), else fp32; "fp32" / "bf16" force one. Part of the
    # model's identity (the model store key holds these settings).
    precision: str = "auto"
    # Where to train: "auto" = CUDA, then MPS, then CPU (or RLHN_DEVICE); resolved() stores the resolved device.
    device: str = "auto"
    # "mnrl" = MultipleNegativesRankingLoss; "cached_mnrl" = CachedMultipleNegativesRankingLoss (GradCache): the same
    # loss computed in chunks of `mini_batch_size` texts, so a batch of 128 queries x 8 passages fits on one GPU.
    loss: str = "mnrl"
    mini_batch_size: int = 32
    gradient_checkpointing: bool = False
    num_processes: int = 1  # DDP processes (lib/train_cli.py starts them with torchrun)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self) -> TrainSettings:
        """The settings with ``device`` and ``precision`` resolved for this machine (what the model depends on)."""
        device = resolve_device(self.device)
        return dataclasses.replace(self, device=device, precision=resolve_precision(self.precision, device))

    def identity(self) -> dict:
        """The settings as a model's identity (lib/model_store.input_key): every field, except the hardware and
        loss fields while they hold the values every model had before they existed (CPU, MNRL, one process, no
        checkpointing), so those models keep their keys; ``mini_batch_size`` counts only for ``cached_mnrl``."""
        d = self.to_dict()
        d["device"] = str(d["device"]).split(":")[0]  # the kind of hardware, not which card
        for name, legacy in _LEGACY_DEFAULTS.items():
            if d.get(name) == legacy:
                del d[name]
        if self.loss != "cached_mnrl":
            d.pop("mini_batch_size", None)
        return d


LOSSES = ("mnrl", "cached_mnrl")
_LEGACY_DEFAULTS = {"device": "cpu", "loss": "mnrl", "gradient_checkpointing": False, "num_processes": 1}


@dataclass(frozen=True)
class TrainingInstance:
    query: str
    positives: tuple[str, ...]  # passage texts (title folded in by the caller)
    negatives: tuple[str, ...]  # in order (rank order of the mined / released negatives)


@dataclass
class TrainResult:
    model_dir: Path
    data_version: str  # dir_hash of the saved model folder
    train_rows: int
    steps: int
    final_loss: float | None  # the last logged training loss (None if nothing was logged)
    seconds: float
    settings: dict
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (global step, logged loss)
    rank: int = 0  # the DDP process that returns this (only rank 0 saves; the others' model_dir is not written)
    world_size: int = 1
    weights_sha: str = ""  # DDP only: a hash of this process's final weights (all ranks hold the same)


# --------------------------------------------------------------------------------------------------
# rows


def _usable(instances: Sequence[TrainingInstance]) -> list[TrainingInstance]:
    """Instances that can form a training example at all: a query with at least one positive.
    An instance without positives (possible only if a caller passes one) is skipped."""
    return [inst for inst in instances if inst.positives]


def _negative_lists(instances: Sequence[TrainingInstance], k: int, seed: int) -> list[tuple[str, ...]] | None:
    """Exactly ``k`` hard negatives per instance, fixed across epochs.

    * the first ``k`` of the instance's own negatives (a negative whose text equals one of the instance's
      positives is ignored: it would teach the model to push the positive away);
    * fewer than ``k`` -> cycle the instance's own negatives (n1, n2, n1, n2, ...);
    * none -> draw ``k`` negatives (seeded, without replacement while possible) from the other instances'
      negatives, skipping texts that are positives of this instance;
    * no instance has any negative at all -> ``None`` (the caller skips every instance: nothing to learn
      hard negatives from; use ``hard_negatives=0`` to train on in-batch negatives only).
    """
    if k <= 0:
        return [() for _ in instances]
    own = []
    for inst in instances:
        pos = set(inst.positives)
        own.append(tuple(n for n in inst.negatives if n not in pos))
    pool = list(dict.fromkeys(n for negs in own for n in negs))  # unique, first-seen order
    if not pool:
        return None
    rng = random.Random(seed * 1000 + 999_999)
    out: list[tuple[str, ...]] = []
    for inst, negs in zip(instances, own):
        if not negs:
            pos = set(inst.positives)
            candidates = [n for n in pool if n not in pos] or pool
            if len(candidates) >= k:
                negs = tuple(rng.sample(candidates, k))
            else:
                negs = tuple(rng.sample(candidates, len(candidates)))
        out.append(tuple(negs[i % len(negs)] for i in range(k)))
    return out


def _epoch_positives(instances: Sequence[TrainingInstance], settings: TrainSettings) -> list[list[str]]:
    """One sampled positive per instance for each epoch: ``[epoch][instance]``."""
    per_epoch = []
    for e in range(max(1, settings.epochs)):
        rng = random.Random(settings.seed * 1000 + e)
        per_epoch.append([rng.choice(inst.positives) for inst in instances])
    return per_epoch


def retriever_rows(instances: Sequence[TrainingInstance], settings: TrainSettings):
    """The MNRL training table: columns ``anchor, positive, negative_1 .. negative_k`` (k = hard_negatives).

    One row per (epoch, instance), epochs concatenated in order; see ``_negative_lists`` for how negatives
    are filled and ``_epoch_positives`` for the positive sampling. Instances without positives are skipped;
    if no instance has any negative (and k > 0) every instance is skipped and the table is empty."""
    from datasets import Dataset

    k = max(0, settings.hard_negatives)
    cols = ["anchor", "positive"] + [f"negative_{i + 1}" for i in range(k)]
    usable = _usable(instances)
    negs = _negative_lists(usable, k, settings.seed) if usable else None
    data: dict[str, list[str]] = {c: [] for c in cols}
    if negs is not None:
        for positives in _epoch_positives(usable, settings):
            for inst, pos, ns in zip(usable, positives, negs):
                data["anchor"].append(inst.query)
                data["positive"].append(pos)
                for i, n in enumerate(ns):
                    data[f"negative_{i + 1}"].append(n)
    return Dataset.from_dict(data)


def reranker_pairs(instances: Sequence[TrainingInstance], settings: TrainSettings):
    """The cross-encoder training table: columns ``query, passage, label`` (1.0 positive / 0.0 hard negative).

    Per epoch and instance: the positive sampled exactly as in ``retriever_rows`` followed by
    ``reranker_negatives`` hard negatives (same fill rules). Same skip rules as ``retriever_rows``."""
    from datasets import Dataset

    k = max(0, settings.reranker_negatives)
    usable = _usable(instances)
    negs = _negative_lists(usable, k, settings.seed) if usable else None
    data: dict[str, list] = {"query": [], "passage": [], "label": []}
    if negs is not None:
        for positives in _epoch_positives(usable, settings):
            for inst, pos, ns in zip(usable, positives, negs):
                for text, label in [(pos, 1.0)] + [(n, 0.0) for n in ns]:
                    data["query"].append(inst.query)
                    data["passage"].append(text)
                    data["label"].append(label)
    return Dataset.from_dict(data)


# --------------------------------------------------------------------------------------------------
# training


def _quiet(trainer) -> None:
    """With tqdm disabled, transformers adds a PrinterCallback that prints every log dict to stdout; our
    callback reports progress through ``log`` instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _log_callback(kind: str, log: Log | None, history: list[tuple[int, float]]):
    from transformers import TrainerCallback

    class _ProgressCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                loss = float(logs["loss"])
                history.append((int(state.global_step), loss))
                if log:
                    lr = logs.get("learning_rate")
                    lr_s = f" lr {float(lr):.2e}" if lr is not None else ""
                    log(f"{kind} step {state.global_step}/{state.max_steps} loss {loss:.4f}{lr_s}")

    return _ProgressCallback()


def _planned_steps(rows: int, settings: TrainSettings) -> int:
    steps = math.ceil(rows / settings.batch_size)
    return min(steps, settings.max_steps) if settings.max_steps > 0 else steps


def world_size() -> int:
    """Processes of this training (torchrun sets WORLD_SIZE); 1 without torchrun."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def per_process_batch(settings: TrainSettings) -> int:
    world = world_size()
    if settings.batch_size % world:
        raise ValueError(f"batch_size {settings.batch_size} is not a multiple of the {world} training processes")
    return settings.batch_size // world


def _common_args(settings: TrainSettings, rows: int, tmp: str) -> dict:
    planned = _planned_steps(rows, settings)
    on_cpu = str(settings.device).split(":")[0] == "cpu"
    extra = {"ddp_backend": "gloo"} if on_cpu and world_size() > 1 else {}
    return dict(
        output_dir=tmp,
        num_train_epochs=1,  # the rows already hold all epochs
        per_device_train_batch_size=per_process_batch(settings),
        learning_rate=settings.learning_rate,
        warmup_steps=float(settings.warmup_ratio) if settings.warmup_ratio < 1 else int(settings.warmup_ratio),
        seed=settings.seed,
        data_seed=settings.seed,
        max_steps=settings.max_steps,
        logging_steps=max(1, min(10, planned // 10)),
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        # The trainer places the model: on the GPU it finds unless the resolved device is the CPU (the setting, or no
        # GPU); bf16 on a CPU needs use_cpu (transformers refuses it otherwise).
        use_cpu=on_cpu,
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        gradient_checkpointing=settings.gradient_checkpointing,
        disable_tqdm=True,
        **extra,
    )


class _threads:
    """Temporarily set torch's intra-op thread count (0 = unchanged)."""

    def __init__(self, n: int):
        self.n, self.prev = n, None

    def __enter__(self):
        if self.n > 0:
            import torch

            self.prev = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.prev is not None:
            import torch

            torch.set_num_threads(self.prev)


def _save_atomically(model, output_dir: Path) -> None:
    """Save into a sibling temp folder, then swap it in: stale files from an earlier run never leak into
    the folder (and so into its content hash)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    # The generated model card (README.md) states the wall-clock training time, which would make the folder
    # hash differ between identical runs: drop that one field (private attribute of sentence-transformers'
    # model card data; if it is ever renamed, the determinism test fails loudly).
    card = getattr(model, "model_card_data", None)
    if card is not None and hasattr(card, "_training_start_time"):
        card._training_start_time = None
    try:
        staging.chmod(0o755)
        model.save(str(staging))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _finish(
    kind: str,
    model,
    trainer_output,
    output_dir: Path,
    rows: int,
    started: float,
    settings: dict,
    history: list[tuple[int, float]],
    log: Log | None,
) -> TrainResult:
    final = history[-1][1] if history else None
    steps = int(trainer_output.global_step)
    ddp = {"rank": rank(), "world_size": world_size(), "weights_sha": _weights_sha(model) if world_size() > 1 else ""}
    if rank() != 0:  # DDP: the other processes hold the same weights; rank 0 alone saves them
        return TrainResult(
            model_dir=Path(output_dir),
            data_version="",
            train_rows=rows,
            steps=steps,
            final_loss=final,
            seconds=time.perf_counter() - started,
            settings=settings,
            loss_history=list(history),
            **ddp,
        )
    _save_atomically(model, output_dir)
    version = dir_hash(output_dir)
    seconds = time.perf_counter() - started
    if log:
        loss_s = f"{final:.4f}" if final is not None else "n/a"
        log(
            f"{kind}: {steps} steps in {seconds:.1f} s, final loss {loss_s}; "
            f"saved {output_dir} (version {version[:12]})"
        )
    return TrainResult(
        model_dir=Path(output_dir),
        data_version=version,
        train_rows=rows,
        steps=steps,
        final_loss=final,
        seconds=seconds,
        settings=settings,
        loss_history=list(history),
        **ddp,
    )


def _weights_sha(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _training_rows(
    kind: str, build_rows, instances: Sequence[TrainingInstance], settings: TrainSettings, empty_message: str
):
    """The set-up both kinds share: offline hub, the clock, the training table (an error if it is empty)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    dataset = build_rows(instances, settings)
    if len(dataset) == 0:
        raise ValueError(f"no {kind} training rows: {empty_message}")
    return started, dataset


def _fit(
    kind: str,
    model,
    loss,
    dataset,
    settings: TrainSettings,
    trainer_cls,
    args_cls,
    extra_args: dict,
    output_dir: str | Path,
    started: float,
    info: dict,
    log: Log | None,
) -> TrainResult:
    """One sentence-transformers trainer run (retriever or reranker) and the saved, hashed model."""
    history: list[tuple[int, float]] = []
    rows = len(dataset)
    with tempfile.TemporaryDirectory(prefix="rlhn-train-") as tmp:
        args = args_cls(**_common_args(settings, rows, tmp), **extra_args)
        trainer = trainer_cls(
            model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[_log_callback(kind, log, history)]
        )
        _quiet(trainer)
        with _threads(settings.torch_threads):
            output = trainer.train()
    return _finish(kind, model, output, Path(output_dir), rows, started, {**settings.to_dict(), **info}, history, log)


def _base(base, base_model_path):
    from rlhn_assets.lib.base_models import resolve_base

    if base is not None:
        return base
    return resolve_base(str(base_model_path or ""))


def _place(settings: TrainSettings) -> str:
    """The device this process loads the model on: under DDP on CUDA, the process's own card."""
    device = str(settings.device)
    if device.split(":")[0] == "cuda" and world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def column_prompts(columns: Sequence[str], query_prompt: str, passage_prompt: str) -> dict[str, str] | None:
    """The trainer's ``prompts``: the query prompt for ``anchor``, the passage prompt for every other column; None
    when both are empty (the trainer then tokenizes the texts as they are)."""
    if not (query_prompt or passage_prompt):
        return None
    return {c: query_prompt if c == "anchor" else passage_prompt for c in columns if c != "label"}


def train_retriever(
    instances: Sequence[TrainingInstance],
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    base=None,
    base_model_path: str | Path | None = None,
    log: Log | None = None,
) -> TrainResult:
    """Fine-tune the bi-encoder with MNRL (in-batch + hard negatives) and save it to ``output_dir``.

    ``base``: a lib/base_models.EncoderBase (folder + prompts); default the packaged MiniLM with its own prompts
    (``base_model_path`` names another folder, with that folder's own prompts)."""
    settings = settings.resolved()
    if settings.loss not in LOSSES:
        raise ValueError(f"loss {settings.loss!r}: expected one of {', '.join(LOSSES)}")
    started, dataset = _training_rows(
        "retriever",
        retriever_rows,
        instances,
        settings,
        "no instance has a positive, or no instance has any negative (set hard_negatives=0 to train on in-batch "
        "negatives only)",
    )
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )
    from transformers import set_seed

    base = _base(base, base_model_path)
    prompts = column_prompts(dataset.column_names, base.query_prompt, base.passage_prompt)
    if log:
        log(
            f"retriever: {len(dataset)} rows ({len(_usable(instances))} queries x {max(1, settings.epochs)} epochs), "
            f"batch {settings.batch_size}, {settings.hard_negatives} hard negatives, scale {settings.scale}, "
            f"~{_planned_steps(len(dataset), settings)} steps, base {base.name} ({base.content_hash[:12]}), "
            f"prompts query {base.query_prompt!r} passage {base.passage_prompt!r}, {settings.device} "
            f"{settings.precision}, {settings.loss}" + (f" x {world_size()} processes" if world_size() > 1 else "")
        )
    set_seed(settings.seed)
    model = SentenceTransformer(str(base.path), device=_place(settings))
    if settings.max_seq_length:
        model.max_seq_length = settings.max_seq_length
    # the saved model keeps the prompts it was trained with (encode_query / encode_document apply them)
    model.prompts = {**model.prompts, "query": base.query_prompt, "document": base.passage_prompt}
    gather = world_size() > 1  # in-batch negatives from every process, as in one process with the whole batch
    if settings.loss == "cached_mnrl":
        loss = CachedMultipleNegativesRankingLoss(
            model, scale=settings.scale, mini_batch_size=settings.mini_batch_size, gather_across_devices=gather
        )
    else:
        loss = MultipleNegativesRankingLoss(model, scale=settings.scale, gather_across_devices=gather)
    return _fit(
        "retriever",
        model,
        loss,
        dataset,
        settings,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        {"batch_sampler": BatchSamplers.NO_DUPLICATES, "prompts": prompts},
        output_dir,
        started,
        {"kind": "retriever", "loss": type(loss).__name__, "base_model": base.describe()},
        log,
    )


def train_reranker(
    instances: Sequence[TrainingInstance],
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    base=None,
    base_model_path: str | Path | None = None,
    log: Log | None = None,
) -> TrainResult:
    """Fine-tune a cross-encoder (the base's weights + new 1-logit head) with BCE and save it to ``output_dir``.
    Bi-encoder prompts do not apply to (query, passage) pairs: ``base``'s prompts are ignored."""
    settings = settings.resolved()
    started, dataset = _training_rows(
        "reranker", reranker_pairs, instances, settings, "no instance has a positive, or no instance has any negative"
    )
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import set_seed

    base = _base(base, base_model_path).without_prompts()
    n_neg = max(0, settings.reranker_negatives)
    if log:
        log(
            f"reranker: {len(dataset)} pairs ({len(_usable(instances))} queries x {max(1, settings.epochs)} epochs x "
            f"(1 + {n_neg})), batch {settings.batch_size}, ~{_planned_steps(len(dataset), settings)} steps, "
            f"base {base.name} ({base.content_hash[:12]}), {settings.device} {settings.precision}"
        )
    set_seed(settings.seed)  # the classifier head is freshly initialised: seed it
    model = CrossEncoder(str(base.path), num_labels=1, max_length=settings.max_seq_length, device=_place(settings))
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(max(1, n_neg))))
    return _fit(
        "reranker",
        model,
        loss,
        dataset,
        settings,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        {},
        output_dir,
        started,
        {
            "kind": "reranker",
            "loss": "BinaryCrossEntropyLoss",
            "pos_weight": float(max(1, n_neg)),
            "base_model": base.describe(),
        },
        log,
    )
