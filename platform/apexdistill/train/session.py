"""Where the training loop runs, and what it reports to: the only place the loop meets Ray's APIs.

``RayTrainSession``: inside a Ray Train worker (or Train's local mode): ranks, the dataset shard,
checkpoints and reports through ``ray.train``.

``TuneTrialSession``: a sweep trial that trains in its own process (``resources.workers: 0``): no
worker group to start, rank 0 of 1, the dataset as the trial's driver read it, checkpoints and
metrics straight to Ray Tune (``ray.tune.report``), which hands the last checkpoint back to a trial
that is restored after an interruption. Ray 2.60 refuses ``ray.train``'s API inside a Tune trial,
Train's local mode included, hence this second session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class RayTrainSession:
    """``local_rows``: a small cache the driver read and put in the object store (a reference to its
    pyarrow tables); each rank then takes its share of it (``LocalRows.shard``) instead of a Ray Data
    shard, so the fit starts no dataset actors. Without it, the trainer's ``datasets`` are used."""

    def __init__(self, local_rows: Any = None) -> None:
        import ray.train

        self._train = ray.train
        self._local_rows = local_rows
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def dataset_shard(self, name: str) -> Any:
        if self._local_rows is not None:
            import ray

            from apexdistill.train.data import LocalRows

            return LocalRows(ray.get(self._local_rows)).shard(self.rank, self.world)
        return self._train.get_dataset_shard(name)

    def get_checkpoint(self) -> Any:
        return self._train.get_checkpoint()

    def checkpoint(self, folder: Path) -> Any:
        return self._train.Checkpoint.from_directory(str(folder))

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        self._train.report(metrics, checkpoint=checkpoint)

    def cuda_device(self) -> torch.device:
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - local mode
            return torch.device("cuda", 0)


class TuneTrialSession:
    """One process, rank 0 of 1. ``last_metrics``/``last_checkpoint`` stand in for the fit's result."""

    rank, world = 0, 1

    def __init__(self, datasets: dict[str, Any]) -> None:
        import ray.tune

        self._tune = ray.tune
        self._datasets = datasets
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: Any = None

    def dataset_shard(self, name: str) -> Any:
        return self._datasets[name]

    def get_checkpoint(self) -> Any:
        return self._tune.get_checkpoint()

    def checkpoint(self, folder: Path) -> Any:
        return self._tune.Checkpoint.from_directory(str(folder))

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        self._tune.report(metrics, checkpoint=checkpoint)
        self.last_metrics = dict(metrics)
        if checkpoint is not None:
            self.last_checkpoint = checkpoint

    def cuda_device(self) -> torch.device:
        return torch.device("cuda", 0)
