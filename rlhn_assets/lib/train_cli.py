"""Train one retriever or reranker outside Dagster, in one process or in several (DDP through ``torchrun``).

One variant from the pipeline's DuckDB file (read only), on 4 GPUs of one machine::

    torchrun --standalone --nproc_per_node 4 -m rlhn_assets.lib.train_cli \\
        --variant s2_rlhn --output models/s2_rlhn --settings '{"batch_size": 128, "loss": "cached_mnrl"}'

or, the same, letting the entry point start torchrun itself: ``python -m rlhn_assets.lib.train_cli --nproc 4 ...``.
``--instances FILE.jsonl`` trains from a saved training set instead (one ``{"query", "positives", "negatives"}``
object per line; ``write_instances`` writes one). The base model and prompts default to the environment
(RLHN_RETRIEVER_BASE / RLHN_RERANKER_BASE, RLHN_QUERY_PROMPT / RLHN_PASSAGE_PROMPT, RLHN_DEVICE, as the Dagster
resource ``base_models``), ``--base`` / ``--query-prompt`` / ``--passage-prompt`` override them.

Every process trains on its share of each batch (lib/training.py: ``batch_size`` is the global batch); only rank 0
saves the model to ``--output`` and writes ``--result`` (the TrainResult as JSON). ``--rank-log DIR`` makes every
rank write ``rank-<r>.json`` (steps, losses, a hash of its final weights), which is how the test sees that both
processes trained the same weights.

The ``trained_retriever`` / ``trained_reranker`` assets call ``train_in_processes`` when their config says
``num_processes > 1``: it writes the instances to a temporary file and runs this module under ``torchrun
--standalone`` (a free port is picked by the rendezvous), streaming the processes' output to the run's log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhn_assets.lib import training
from rlhn_assets.lib.training import TrainingInstance, TrainResult, TrainSettings

Log = Callable[[str], None]


def write_instances(path: str | Path, instances: Sequence[TrainingInstance]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for inst in instances:
            row = {"query": inst.query, "positives": list(inst.positives), "negatives": list(inst.negatives)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_instances(path: str | Path) -> list[TrainingInstance]:
    with open(path, encoding="utf-8") as fh:
        return [
            TrainingInstance(r["query"], tuple(r["positives"]), tuple(r.get("negatives", ())))
            for r in map(json.loads, fh)
            if r
        ]


def result_to_json(result: TrainResult) -> dict:
    d = dataclasses.asdict(result)
    d["model_dir"] = str(result.model_dir)
    return d


def result_from_json(d: dict) -> TrainResult:
    d = dict(d)
    d["model_dir"] = Path(d["model_dir"])
    d["loss_history"] = [tuple(x) for x in d.get("loss_history", [])]
    return TrainResult(**d)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rlhn_assets.lib.train_cli", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("retriever", "reranker"), default="retriever")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--variant", help="a relabeled variant in the DuckDB file (e.g. s2_rlhn)")
    src.add_argument("--instances", help="a saved training set (JSONL: query, positives, negatives)")
    ap.add_argument("--duckdb", help="the pipeline's DuckDB file (default: RLHN_DUCKDB or data/rlhn.duckdb)")
    ap.add_argument("--output", required=True, help="the model folder rank 0 writes")
    ap.add_argument("--settings", default="{}", help="TrainSettings fields as JSON (lib/training.py)")
    ap.add_argument("--seed", type=int, help="shorthand for the settings' seed")
    ap.add_argument("--base", help="base model folder or hub id (default: the environment / the packaged MiniLM)")
    ap.add_argument("--query-prompt", help="query prompt (default: the environment, else the model's own)")
    ap.add_argument("--passage-prompt", help="passage prompt (default: the environment, else the model's own)")
    ap.add_argument("--result", help="write the TrainResult here as JSON (rank 0)")
    ap.add_argument("--rank-log", help="a folder where every rank writes rank-<r>.json")
    ap.add_argument("--nproc", type=int, default=1, help="start this many processes with torchrun (default 1)")
    return ap


def _base(args):
    from rlhn_assets.lib.base_models import resolve_base, settings_from_env

    env = settings_from_env()
    if args.base is not None:
        name = args.base
    elif args.kind == "reranker":
        name = env["reranker"] or env["retriever"]  # the resource's rule: the reranker follows the retriever
    else:
        name = env["retriever"]
    qp = args.query_prompt if args.query_prompt is not None else env["query_prompt"]
    pp = args.passage_prompt if args.passage_prompt is not None else env["passage_prompt"]
    return resolve_base(name, qp, pp)


def _settings(args) -> TrainSettings:
    fields = json.loads(args.settings)
    if args.seed is not None:
        fields["seed"] = args.seed
    unknown = set(fields) - {f.name for f in dataclasses.fields(TrainSettings)}
    if unknown:
        raise SystemExit(f"--settings: unknown field(s) {sorted(unknown)}")
    if "device" not in fields:
        from rlhn_assets.lib.base_models import settings_from_env

        fields["device"] = settings_from_env()["device"]
    fields["num_processes"] = training.world_size()  # part of the model's identity: what really ran
    return TrainSettings(**fields)


def _instances(args, settings: TrainSettings) -> list[TrainingInstance]:
    if args.instances:
        return read_instances(args.instances)
    from rlhn_assets import settings as project_settings
    from rlhn_assets.lib.db import connect
    from rlhn_assets.lib.training_data import load_training_instances

    db = args.duckdb or str(project_settings.duckdb_path())
    with connect(db, read_only=True) as conn:
        instances, _ = load_training_instances(conn, args.variant, max_negatives=max(settings.hard_negatives, 25))
    if not instances:
        raise SystemExit(f"variant {args.variant!r} has no training instances in {db}")
    return instances


def torchrun_command(nproc: int, module_args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m rlhn_assets.lib.train_cli ...`` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one machine; the rendezvous picks a free port
        f"--nproc_per_node={int(nproc)}",
        "-m",
        __name__ if __name__ != "__main__" else "rlhn_assets.lib.train_cli",
        *module_args,
    ]


def _print(message: str) -> None:
    print(message, flush=True)  # torchrun passes each rank's stdout through: line by line, not at exit


def run(argv: Sequence[str] | None = None, log: Log = _print) -> TrainResult | None:
    args = _parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
        rest = [a for a in rest if not a.startswith("--nproc=")]
        code = subprocess.call(torchrun_command(args.nproc, rest))
        if code:
            raise SystemExit(code)
        return None
    settings = _settings(args)
    base = _base(args)
    r, world = training.rank(), training.world_size()
    prefix = f"[rank {r}/{world}] " if world > 1 else ""
    instances = _instances(args, settings)
    fn = training.train_retriever if args.kind == "retriever" else training.train_reranker
    result = fn(instances, settings, args.output, base=base, log=lambda m: log(prefix + m))
    if args.rank_log:
        folder = Path(args.rank_log)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{r}.json").write_text(
            json.dumps(
                {
                    "rank": r,
                    "world_size": world,
                    "steps": result.steps,
                    "final_loss": result.final_loss,
                    "loss_history": result.loss_history,
                    "weights_sha": result.weights_sha,
                    "device": result.settings.get("device"),
                    "pid": os.getpid(),
                }
            )
        )
    log(f"{prefix}done: {result.steps} steps, final loss {result.final_loss}")
    if r == 0 and args.result:
        tmp = Path(args.result).with_suffix(".tmp")
        tmp.write_text(json.dumps(result_to_json(result), default=str))
        tmp.replace(args.result)
    return result


def train_in_processes(
    kind: str,
    instances: Sequence[TrainingInstance],
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    base,
    nproc: int,
    log: Log | None = None,
    rank_log: str | Path | None = None,
) -> TrainResult:
    """Train ``kind`` with ``nproc`` DDP processes (torchrun) and return rank 0's TrainResult."""
    log = log or (lambda m: None)
    with tempfile.TemporaryDirectory(prefix="rlhn-ddp-") as tmp:
        data, result = Path(tmp) / "instances.jsonl", Path(tmp) / "result.json"
        write_instances(data, instances)
        fields = {k: v for k, v in settings.to_dict().items() if k != "num_processes"}
        args = [
            "--kind",
            kind,
            "--instances",
            str(data),
            "--output",
            str(output_dir),
            "--settings",
            json.dumps(fields),
            "--base",
            str(base.path),
            f"--query-prompt={base.query_prompt}",
            f"--passage-prompt={base.passage_prompt}",
            "--result",
            str(result),
        ]
        if rank_log:
            args += ["--rank-log", str(rank_log)]
        cmd = torchrun_command(nproc, args)
        log(f"{kind}: starting {nproc} training processes: torchrun --standalone --nproc_per_node {nproc}")
        # the processes import this very package (not another install of it), whatever their working directory
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            if line.startswith("[rank ") or "Error" in line:
                log(line)
        if proc.wait() != 0 or not result.exists():
            raise RuntimeError(
                f"{kind}: torchrun with {nproc} processes ended with exit code {proc.returncode}; last output:\n"
                + "\n".join(tail)
            )
        return result_from_json(json.loads(result.read_text()))


def main() -> None:
    run()


if __name__ == "__main__":
    main()
