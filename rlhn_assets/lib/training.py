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

from rlhn_assets.lib.embeddings import base_model_path as _default_base_model_path
from rlhn_assets.lib.embeddings import dir_hash, resolve_precision

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
    max_seq_length: int = 256
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _common_args(settings: TrainSettings, rows: int, tmp: str) -> dict:
    planned = _planned_steps(rows, settings)
    return dict(
        output_dir=tmp,
        num_train_epochs=1,  # the rows already hold all epochs
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=float(settings.warmup_ratio) if settings.warmup_ratio < 1 else int(settings.warmup_ratio),
        seed=settings.seed,
        data_seed=settings.seed,
        max_steps=settings.max_steps,
        logging_steps=max(1, min(10, planned // 10)),
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        use_cpu=True,
        bf16=resolve_precision(settings.precision, "cpu") == "bf16",
        disable_tqdm=True,
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
    _save_atomically(model, output_dir)
    version = dir_hash(output_dir)
    final = history[-1][1] if history else None
    seconds = time.perf_counter() - started
    steps = int(trainer_output.global_step)
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
    )


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


def train_retriever(
    instances: Sequence[TrainingInstance],
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    base_model_path: str | Path | None = None,
    log: Log | None = None,
) -> TrainResult:
    """Fine-tune the bi-encoder with MNRL (in-batch + hard negatives) and save it to ``output_dir``."""
    started, dataset = _training_rows(
        "retriever",
        retriever_rows,
        instances,
        settings,
        "no instance has a positive, or no instance has any negative (set hard_negatives=0 to train on in-batch "
        "negatives only)",
    )
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )
    from transformers import set_seed

    base = Path(base_model_path or _default_base_model_path())
    if log:
        log(
            f"retriever: {len(dataset)} rows ({len(_usable(instances))} queries x {max(1, settings.epochs)} epochs), "
            f"batch {settings.batch_size}, {settings.hard_negatives} hard negatives, scale {settings.scale}, "
            f"~{_planned_steps(len(dataset), settings)} steps, base {base.name}"
        )
    set_seed(settings.seed)
    model = SentenceTransformer(str(base), device="cpu")
    model.max_seq_length = settings.max_seq_length
    loss = MultipleNegativesRankingLoss(model, scale=settings.scale)
    return _fit(
        "retriever",
        model,
        loss,
        dataset,
        settings,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        {"batch_sampler": BatchSamplers.NO_DUPLICATES},
        output_dir,
        started,
        {"kind": "retriever", "loss": "MultipleNegativesRankingLoss", "base_model": str(base)},
        log,
    )


def train_reranker(
    instances: Sequence[TrainingInstance],
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    base_model_path: str | Path | None = None,
    log: Log | None = None,
) -> TrainResult:
    """Fine-tune a cross-encoder (MiniLM weights + new 1-logit head) with BCE and save it to ``output_dir``."""
    started, dataset = _training_rows(
        "reranker", reranker_pairs, instances, settings, "no instance has a positive, or no instance has any negative"
    )
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import set_seed

    base = Path(base_model_path or _default_base_model_path())
    n_neg = max(0, settings.reranker_negatives)
    if log:
        log(
            f"reranker: {len(dataset)} pairs ({len(_usable(instances))} queries x {max(1, settings.epochs)} epochs x "
            f"(1 + {n_neg})), batch {settings.batch_size}, ~{_planned_steps(len(dataset), settings)} steps, "
            f"base {base.name}"
        )
    set_seed(settings.seed)  # the classifier head is freshly initialised: seed it
    model = CrossEncoder(str(base), num_labels=1, max_length=settings.max_seq_length, device="cpu")
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
            "base_model": str(base),
        },
        log,
    )
