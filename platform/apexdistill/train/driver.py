"""Launch the worker loop with Ray Train's ``TorchTrainer`` and collect the result.

Run names are stable (no timestamps): running the same name again resumes from its last checkpoint
(Ray Train V2 resumes by ``RunConfig(name, storage_path)``; ``resume_from_checkpoint`` raises).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexdistill.config import Config, dump_yaml


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint_dir: Path
    metrics: dict[str, Any]


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.workdir).resolve() / "runs" / cfg.run.name


def clear_run(cfg: Config) -> None:
    """Delete a run's folder and Ray's record of it, so the next fit starts fresh instead of resuming."""
    import shutil

    folder = run_dir(cfg)
    for path in (folder, folder.parent.parent / "ray_results" / cfg.run.name):
        shutil.rmtree(path, ignore_errors=True)


def ensure_ray(address: str | None = None) -> None:
    """Start (or join) Ray once per process, quietly, with offline workers."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS"),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}},
    )


def run_training(cfg: Config, address: str | None = None) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    from apexdistill.train.loop import train_loop_per_worker

    from apexdistill.data.preprocess import read_cache, run_preprocess
    from apexdistill.train.data import DataShapes, row_bytes

    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "config.yaml")
    ensure_ray(address)
    cache = run_preprocess(cfg)  # a cache hit costs milliseconds and encodes nothing
    shapes = DataShapes.from_manifest(cache.manifest, cache.uri)
    shapes.save(out)
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.train.num_workers,
        use_gpu=False,
        resources_per_worker={"CPU": cfg.train.cpus_per_worker} if cfg.train.num_workers > 0 else None,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(out), "shapes": shapes.__dict__,
                           "row_bytes": row_bytes(cache.manifest)},
        datasets={"train": read_cache(cache.uri)},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=str(out.parent.parent / "ray_results"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name} finished without a checkpoint")
    from apexdistill.train.loop import latest_checkpoint

    # local mode reports the folder we published; with workers Ray has a copy under storage_path
    checkpoint = latest_checkpoint(out) or Path(result.checkpoint.path)
    return TrainResult(run_dir=out, checkpoint_dir=checkpoint, metrics=dict(result.metrics or {}))
