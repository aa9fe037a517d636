"""Training batches for the worker loop, read from the preprocessed Parquet cache.

Each worker gets its shard with ``ray.train.get_dataset_shard("train")``. A shard that fits in
memory (``data.in_memory_max_mb``) is read once and then sampled from RAM, so small datasets like
the built-in digits pay Ray Data's per-epoch start-up once; larger shards stream epoch by epoch
with ``iter_torch_batches`` and a local shuffle buffer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from apexdistill.config import Config
from apexdistill.data.digits import CAPTIONS

SHAPES_FILE = "data_shapes.json"


@dataclass(frozen=True)
class DataShapes:
    """What a backbone must be built for: sample channels/size and text width."""

    channels: int
    resolution: int
    text_dim: int
    rows: int = 0
    cache_uri: str = ""

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], uri: str) -> "DataShapes":
        x_shape, text_shape = manifest["columns"]["x"]["shape"], manifest["columns"]["text"]["shape"]
        return cls(int(x_shape[0]), int(x_shape[-1]), int(text_shape[-1]), int(manifest["rows"]), uri)

    def save(self, run_dir: Path) -> None:
        (run_dir / SHAPES_FILE).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> "DataShapes":
        path = run_dir / SHAPES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"'{run_dir}' has no {SHAPES_FILE}: is it a run folder made by 'apexdistill train'?")
        return cls(**json.loads(path.read_text()))


class InMemoryBatches:
    """Random batches (with replacement) from tensors held in RAM."""

    def __init__(self, rows: dict[str, Tensor], seed: int) -> None:
        self.rows, self.seed = rows, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.n = int(rows["x"].shape[0])
        if self.n == 0:
            raise ValueError("the training shard is empty")

    def next(self, batch_size: int) -> dict[str, Tensor]:
        idx = torch.randint(0, self.n, (batch_size,), generator=self.generator)
        return {k: v[idx] for k, v in self.rows.items()}

    def resume_at(self, step: int, rng_state: Tensor | None = None) -> None:
        if rng_state is not None:
            self.generator.set_state(rng_state)
        else:  # an old checkpoint without the sampler state
            self.generator.manual_seed(self.seed + 7919 * step)

    def close(self) -> None:
        pass


class StreamingBatches:
    """Epoch after epoch over a Ray Data shard, shuffled locally with a per-epoch seed."""

    def __init__(self, shard: Any, batch_size: int, seed: int) -> None:
        self.shard, self.batch_size, self.seed = shard, batch_size, seed
        self.epoch = 0
        self._it: Iterator[dict[str, Tensor]] = self._epoch()

    def _epoch(self) -> Iterator[dict[str, Tensor]]:
        while True:
            yield from self.shard.iter_torch_batches(
                batch_size=self.batch_size, drop_last=True,
                local_shuffle_buffer_size=max(4 * self.batch_size, 1024), local_shuffle_seed=self.seed + self.epoch,
            )
            self.epoch += 1

    def next(self, batch_size: int) -> dict[str, Tensor]:
        return next(self._it)

    def resume_at(self, step: int, rng_state: Tensor | None = None) -> None:
        """Streaming resumes at the start of an epoch (the data position is not restored)."""

    def close(self) -> None:
        """Stop the open epoch's iterator while Ray is still up (not at garbage collection)."""
        self._it.close()


def shard_batches(shard: Any, cfg: Config, rows: int, row_bytes: int, seed: int) -> InMemoryBatches | StreamingBatches:
    if rows * row_bytes <= cfg.data.in_memory_max_mb * 2**20:
        parts = list(shard.iter_torch_batches(batch_size=4096))
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {"x": torch.empty(0)}
        return InMemoryBatches(tensors, seed)
    return StreamingBatches(shard, cfg.train.batch_size, seed)


def row_bytes(manifest: dict[str, Any]) -> int:
    total = 0
    for col in manifest["columns"].values():
        n = 1
        for d in col.get("shape") or []:
            n *= int(d)
        total += n * (8 if "64" in str(col.get("dtype", "")) else 4)
    return total


def encode_captions(cfg: Config, captions: list[str]) -> tuple[Tensor, Tensor]:
    from apexdistill.models.text import build_text_encoder

    return build_text_encoder(cfg.text_encoder).encode(captions)


def digit_caption_table(cfg: Config) -> tuple[Tensor, Tensor]:
    """Text states of the ten digit prompts, (10, L, D) and (10, L): evaluation and sample grids."""
    return encode_captions(cfg, CAPTIONS)
