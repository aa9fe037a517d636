"""Training batches for the worker loop, read from the preprocessed Parquet cache.

A cache that fits in memory (``data.in_memory_max_mb``) is read once by the driver and put in the
object store; each worker takes its equal, strided share (``LocalRows.shard``) and samples from RAM.
Larger caches go to the workers as Ray Data shards (``ray.train.get_dataset_shard("train")``); a
shard that fits in memory is read once, larger ones stream epoch by epoch with
``iter_torch_batches`` and a local shuffle buffer.

With aspect-ratio buckets (``data.buckets``) every batch comes from one bucket. Which one is decided
by a ``BucketSchedule`` that every rank computes alike (seeded by ``run.seed`` and the draw number,
bucket chosen with probability proportional to its rows), so all ranks run the same shapes at the
same step in the same proportions; each rank then samples that bucket's rows from its own shard. A
bucket that some rank's shard has no row of is left out of the schedule (the loop says which), so no
rank ever waits for rows it does not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
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
    #: with data.buckets: each bucket's cached (h, w) (latent or pixel) and its rows; None without
    buckets: list[list[int]] | None = None
    bucket_rows: list[int] | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], uri: str) -> "DataShapes":
        text_shape = manifest["columns"]["text"]["shape"]
        if manifest.get("buckets"):  # the square data.resolution's shape, what the backbone's sample size is
            x_shape = manifest["encoders"]["vae"]["x_shape"]
            buckets = [list(b["x_shape"][1:]) for b in manifest["buckets"]]
            return cls(int(x_shape[0]), int(x_shape[-1]), int(text_shape[-1]), int(manifest["rows"]), uri, buckets,
                       [int(b["rows"]) for b in manifest["buckets"]])
        x_shape = manifest["columns"]["x"]["shape"]
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


class BucketSchedule:
    """The bucket of every draw (micro-batch): the same on every rank, from ``run.seed`` and the draw
    number alone (so a resumed run continues the same sequence), with probability proportional to
    ``weights`` (rows per bucket; 0 leaves a bucket out)."""

    def __init__(self, weights: list[float], seed: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError("no bucket has rows on every rank: there is nothing to train on (see data.buckets)")
        self.p, self.seed = w / w.sum(), int(seed)

    def bucket(self, draw: int) -> int:
        return int(np.random.default_rng([self.seed, int(draw)]).choice(len(self.p), p=self.p))


def _rows_by_bucket(batches: Iterator[dict[str, np.ndarray]], n_buckets: int) -> dict[int, dict[str, Tensor]]:
    """Numpy batches of a bucketed cache (``x`` fixed- or variable-shaped) -> per-bucket tensors."""
    rows: dict[int, dict[str, list]] = {}
    for batch in batches:
        for i, b in enumerate(batch["bucket"]):
            into = rows.setdefault(int(b), {})
            for k, v in batch.items():
                into.setdefault(k, []).append(np.asarray(v[i]))
    out = {}
    for b, cols in rows.items():
        if not 0 <= b < n_buckets:
            raise ValueError(f"the cache has rows of bucket {b}, but its manifest lists {n_buckets} buckets")
        out[b] = {k: torch.from_numpy(np.stack(v)) for k, v in cols.items()}
    return out


class LocalRows:
    """A small cache already read into this process (pyarrow tables, ``read_cache_tables``), with the
    part of a Ray Dataset's iterator API that the in-memory batch sources use. Every small cache is
    trained from it: a sweep trial that trains in its own process reads it directly, and Ray Train
    workers take their ``shard`` of the tables the driver put in the object store. No Ray Data task
    has to find a free CPU while the workers or trials hold them all, and a fit starts no dataset
    actors. Batches convert with Ray Data's own block conversion, so they are what
    ``iter_batches``/``iter_torch_batches`` of the same tables give."""

    def __init__(self, tables: list[Any]) -> None:
        self.tables = tables

    def shard(self, rank: int, world: int) -> "LocalRows":
        """Rank ``rank``'s equal share of ``world``: rows rank, rank + world, ... (in manifest order), the
        first ``rows // world`` of them, like Ray Data's ``streaming_split(equal=True)`` drops the
        remainder. Strided, so every rank gets rows of every file (and of every bucket that has at least
        ``world`` rows)."""
        import pyarrow as pa

        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        keep = sum(t.num_rows for t in self.tables) // world
        out, offset, taken = [], 0, 0
        for table in self.tables:
            idx = np.arange((rank - offset) % world, table.num_rows, world)[: keep - taken]
            if len(idx):
                out.append(table.take(pa.array(idx)))
                taken += len(idx)
            offset += table.num_rows
        return LocalRows(out)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy") -> Iterator[dict[str, np.ndarray]]:
        from ray.data.block import BlockAccessor

        if batch_format != "numpy":
            raise ValueError(f"LocalRows gives numpy batches, not {batch_format!r}")
        for table in self.tables:
            for start in range(0, table.num_rows, batch_size):
                yield BlockAccessor.for_block(table.slice(start, batch_size)).to_batch_format("numpy")

    def iter_torch_batches(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        for batch in self.iter_batches(batch_size):  # tables from the object store are read-only: copy those
            yield {k: torch.as_tensor(v if v.flags.writeable else v.copy()) for k, v in batch.items()}


def bucket_weights(local_counts: list[int]) -> tuple[list[int], list[int]]:
    """(weights, left-out buckets): rows per bucket summed over ranks, 0 for a bucket that some rank's
    shard has no row of. Every rank gets the same answer (all-reduced counts)."""
    from apexdistill.train.strategy import distributed

    counts = torch.tensor(local_counts, dtype=torch.int64)
    least, total = counts.clone(), counts.clone()
    if distributed():
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        least, total = least.to(device), total.to(device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        least, total = least.cpu(), total.cpu()
    weights = [int(t) if int(m) > 0 else 0 for m, t in zip(least, total)]
    return weights, [b for b, (m, t) in enumerate(zip(least, total)) if int(m) == 0 and int(t) > 0]


class BucketedInMemoryBatches(InMemoryBatches):
    """Random batches (with replacement) from one bucket at a time, the bucket from the shared schedule."""

    def __init__(self, by_bucket: dict[int, dict[str, Tensor]], n_buckets: int, seed: int, schedule_seed: int, draws_per_step: int) -> None:
        self.by_bucket, self.seed, self.draws_per_step = by_bucket, seed, draws_per_step
        self.generator = torch.Generator().manual_seed(seed)
        counts = [int(by_bucket[b]["x"].shape[0]) if b in by_bucket else 0 for b in range(n_buckets)]
        weights, self.left_out = bucket_weights(counts)
        self.schedule = BucketSchedule(weights, schedule_seed)
        self.n, self.draw = sum(counts), 0

    def next(self, batch_size: int) -> dict[str, Tensor]:
        rows = self.by_bucket[self.schedule.bucket(self.draw)]
        self.draw += 1
        idx = torch.randint(0, int(rows["x"].shape[0]), (batch_size,), generator=self.generator)
        return {k: v[idx] for k, v in rows.items()}

    def resume_at(self, step: int, rng_state: Tensor | None = None) -> None:
        super().resume_at(step, rng_state)
        self.draw = step * self.draws_per_step


class BucketedStreamingBatches:
    """Epoch after epoch over a Ray Data shard, rows queued per bucket (at most ``capacity`` each,
    the oldest dropped beyond that), each batch taken from the bucket the shared schedule names. A
    bucket that the shard cannot fill within a whole epoch is sampled with replacement from what is
    queued; one with no row at all in the shard is an error that says what to change."""

    def __init__(self, shard: Any, batch_size: int, seed: int, weights: list[int], schedule_seed: int, draws_per_step: int) -> None:
        from collections import deque

        self.shard, self.batch_size, self.seed, self.draws_per_step = shard, batch_size, seed, draws_per_step
        self.schedule = BucketSchedule(weights, schedule_seed)
        self.left_out: list[int] = []
        self.queues = [deque(maxlen=4 * batch_size) for _ in weights]
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.draw = 0, 0
        self._it = self._epoch()

    def _epoch(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield from self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                               local_shuffle_buffer_size=max(4 * self.batch_size, 1024),
                                               local_shuffle_seed=self.seed + self.epoch)
            self.epoch += 1

    def next(self, batch_size: int) -> dict[str, Tensor]:
        b = self.schedule.bucket(self.draw)
        self.draw += 1
        queue, start = self.queues[b], self.epoch
        while len(queue) < batch_size and self.epoch - start < 2:  # at most one whole epoch past the current one
            batch = next(self._it)
            for i, bucket in enumerate(batch["bucket"]):
                self.queues[int(bucket)].append({k: np.asarray(v[i]) for k, v in batch.items()})
        if not queue:
            raise RuntimeError(f"bucket {b} has no row in this rank's shard after a whole epoch; raise data.in_memory_max_mb "
                               f"so the shard is read into memory (buckets missing on a rank are then left out), or drop the bucket")
        if len(queue) >= batch_size:
            rows = [queue.popleft() for _ in range(batch_size)]
        else:  # a bucket smaller than a batch in this shard: with replacement
            rows = [queue[int(i)] for i in torch.randint(0, len(queue), (batch_size,), generator=self.generator)]
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}

    def resume_at(self, step: int, rng_state: Tensor | None = None) -> None:
        """Streaming resumes at the start of an epoch; the bucket sequence continues where it was."""
        self.draw = step * self.draws_per_step

    def close(self) -> None:
        self._it.close()


def shard_batches(shard: Any, cfg: Config, rows: int, row_bytes: int, seed: int,
                  shapes: DataShapes | None = None) -> InMemoryBatches | StreamingBatches | BucketedInMemoryBatches | BucketedStreamingBatches:
    """The worker's batch source. With buckets (``shapes.buckets``), batches from one bucket at a time
    on the schedule that every rank shares (seeded by ``run.seed``)."""
    bucketed = shapes is not None and shapes.buckets is not None
    accum = cfg.train.grad_accum_steps
    if rows * row_bytes <= cfg.data.in_memory_max_mb * 2**20:
        if bucketed:
            by_bucket = _rows_by_bucket(shard.iter_batches(batch_size=4096, batch_format="numpy"), len(shapes.buckets))
            return BucketedInMemoryBatches(by_bucket, len(shapes.buckets), seed, cfg.run.seed, accum)
        parts = list(shard.iter_torch_batches(batch_size=4096))
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {"x": torch.empty(0)}
        return InMemoryBatches(tensors, seed)
    if bucketed:  # rows per bucket from the manifest; one with fewer rows than ranks cannot be on every rank
        from apexdistill.train.strategy import distributed

        world = torch.distributed.get_world_size() if distributed() else 1
        weights = [n if n >= world else 0 for n in shapes.bucket_rows or []]
        batches = BucketedStreamingBatches(shard, cfg.train.batch_size, seed, weights, cfg.run.seed, accum)
        batches.left_out = [b for b, n in enumerate(shapes.bucket_rows or []) if 0 < n < world]
        return batches
    return StreamingBatches(shard, cfg.train.batch_size, seed)


def row_bytes(manifest: dict[str, Any]) -> int:
    """Bytes per cached row (with buckets, a row of the largest bucket)."""
    total = 0
    for name, col in manifest["columns"].items():
        shape = col.get("shape")
        if name == "x" and shape is None and manifest.get("buckets"):
            shape = max((b["x_shape"] for b in manifest["buckets"]), key=lambda s: int(np.prod(s)))
        n = 1
        for d in shape or []:
            n *= int(d)
        total += n * (8 if "64" in str(col.get("dtype", "")) else 4)
    return total


def encode_captions(cfg: Config, captions: list[str]) -> tuple[Tensor, Tensor]:
    from apexdistill.models.text import build_text_encoder

    return build_text_encoder(cfg.text_encoder).encode(captions)


def digit_caption_table(cfg: Config) -> tuple[Tensor, Tensor]:
    """Text states of the ten digit prompts, (10, L, D) and (10, L): evaluation and sample grids."""
    return encode_captions(cfg, CAPTIONS)
