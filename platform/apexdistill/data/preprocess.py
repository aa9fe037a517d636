"""Ray Data preprocessing: source rows -> cached text embeddings and latents (or pixels) in Parquet.

Pipeline (one streaming Ray Data job, Ray's progress output on the console)::

    plan rows --decode/convert/resize/crop/scale (CPU tasks)--> text encoder (actor pool)
              --> VAE encoder (actor pool, only when vae.path is set) --> write_parquet (temp folder)
              --> rejects.parquet, manifest.json (last) --> publish as CACHE_URI/<key>/

A second run with the same inputs finds the manifest and returns before Ray is even started.
Rows that cannot be used are never fatal on their own: they are recorded with a reason, and the job
fails (publishing nothing) only when their share exceeds ``data.max_reject_fraction``.

Cached row schema: ``x`` (C, H, W) float32 (pixels in [-1, 1] or VAE latents), ``text`` (L, D)
float32, ``text_mask`` (L,) int64, ``caption`` str, ``label`` int64 (-1 when unknown), ``row_id`` str;
with ``data.buckets`` also ``bucket`` int64 (an index into the manifest's ``buckets``), and ``x`` is
then a variable-shaped tensor column (each row its bucket's shape, ``data/buckets.py``).
"""

from __future__ import annotations

import contextlib
import io
import math
import posixpath
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import ray

from apexdistill.config import Config
from apexdistill.console import on_worker_death, process_died
from apexdistill.data.buckets import bucket_table, nearest_bucket
from apexdistill.data.cache import DATA, NEGATIVE, REJECTS, CacheSpec, CacheStore, build_manifest, cache_spec, default_cache_uri, read_complete_manifest
from apexdistill.data.sources import SourcePlan, arrow_fs, build_source, open_fs, read_parquet_fragment, reject, worker_visible

# Name of an optional Ray actor that counts encoder-actor constructions (tests and tools create it
# with ``EncoderProbe``; when it does not exist the encoders skip it).
ENCODER_PROBE = "apexdistill-encoder-probe"
COLUMNS = ("x", "text", "text_mask", "caption", "label", "row_id")
TRAIN_COLUMNS = ("x", "text", "text_mask", "label")  # what iter_torch_batches can turn into tensors
REJECT_COLUMNS = ("row_id", "file", "reason", "detail")
MIN_ROWS_PER_FILE = 2048

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"} | _ALPHA_MODES
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": None, "F": None}


class PreprocessError(ValueError):
    """The preprocessing job failed for a reason the user can act on (too many rejects, no rows)."""


class ImageProblem(ValueError):
    """One row's image cannot be used; ``reason`` is the short category recorded in the rejects."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class CacheInfo:
    """What ``run_preprocess`` produced or found."""

    uri: str  # the cache folder CACHE_URI/<key> (pass it to read_cache)
    key: str
    hit: bool
    rows: int
    rejected: int
    truncated: int
    rejects_uri: str
    manifest: dict[str, Any] = field(repr=False)
    seconds: float = 0.0
    encoder_actors: int = 0  # encoder actors constructed by this call (0 on a hit)


# ----------------------------------------------------------------------------- images


def load_image(data: bytes) -> Any:
    """Bytes -> a fully decoded PIL image (first frame, EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        img.seek(0)
        img.load()
        return ImageOps.exif_transpose(img) if img.getexif() else img
    except Exception as exc:  # PIL raises many types for corrupt, truncated or oversized files
        raise ImageProblem("undecodable", f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _flatten_alpha(img: Any) -> Any:
    """Transparent pixels over white (what a viewer shows), as RGB."""
    from PIL import Image

    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def prepare_image(img: Any, channels: int, resolution: int, width: int | None = None) -> np.ndarray:
    """PIL image -> (C, R, R) float32 in [-1, 1] (or (C, resolution, width) for a bucket): mode
    conversion (grayscale 'L' for 1 channel, RGB for 3; alpha over white; 16-bit kept at full
    precision), resized so it covers the target (bicubic, antialiased; for a square, the shorter side
    to R), centre crop."""
    from PIL import Image

    mode = img.mode
    if mode in _WIDE_MODES:  # 16/32-bit integer or float grayscale: work in float 0..255
        arr = np.asarray(img, dtype=np.float32)
        scale = _WIDE_MODES[mode] or (1.0 if arr.max(initial=0) <= 1.0 and mode == "F" else 65535.0 if arr.max(initial=0) > 255 else 255.0)
        img = Image.fromarray(np.clip(arr / scale, 0.0, 1.0) * 255.0, mode="F")
    elif mode in _EIGHT_BIT_MODES:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            img = _flatten_alpha(img)
        img = img.convert("L" if channels == 1 else "RGB")
    else:
        raise ImageProblem("unsupported_mode", f"unsupported image mode '{mode}'")

    w, h = img.size
    if w < 1 or h < 1:
        raise ImageProblem("undecodable", f"empty image ({w}x{h})")
    out_h, out_w = resolution, width or resolution
    scale = max(out_h / h, out_w / w)
    size = (max(out_w, round(w * scale)), max(out_h, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - out_w) // 2, (size[1] - out_h) // 2
    img = img.crop((left, top, left + out_w, top + out_h))

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.shape[0] != channels:  # a float grayscale image asked for 3 channels
        arr = np.repeat(arr, channels, axis=0)
    return np.clip(arr, -1.0, 1.0).astype(np.float32)


def decode_image_bytes(data: bytes, channels: int, resolution: int) -> np.ndarray:
    return prepare_image(load_image(data), channels, resolution)


# ----------------------------------------------------------------------------- stats side channel


@ray.remote(num_cpus=0)
class _BuildStats:
    """Collects rejects, truncated captions and encoder constructions from tasks and actors (keyed by
    row id, so a retried batch is not counted twice)."""

    def __init__(self) -> None:
        self.rejects: dict[str, dict[str, str]] = {}
        self.truncated: set[str] = set()
        self.encoders: Counter = Counter()
        self.negative: dict[str, Any] | None = None
        self.encoded = 0

    def set_negative(self, negative: dict[str, Any]) -> None:
        self.negative = negative

    def get_negative(self) -> dict[str, Any] | None:
        return self.negative

    def add_rejects(self, rows: list[dict[str, str]]) -> None:
        for row in rows:
            self.rejects[row["row_id"]] = row

    def add_encoded(self, rows: int) -> None:
        self.encoded += rows

    def progress(self) -> int:
        return self.encoded

    def add_truncated(self, row_ids: list[str]) -> None:
        self.truncated.update(row_ids)

    def encoder_started(self, kind: str) -> None:
        self.encoders[kind] += 1

    def summary(self) -> dict[str, Any]:
        return {"rejects": list(self.rejects.values()), "truncated": len(self.truncated), "encoders": dict(self.encoders)}


@ray.remote(num_cpus=0)
class EncoderProbe:
    """Counts encoder-actor constructions: ``EncoderProbe.options(name=ENCODER_PROBE).remote()``."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def record(self, kind: str) -> None:
        self.counts[kind] += 1

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def _announce_encoder(kind: str, stats: Any) -> None:
    ray.get(stats.encoder_started.remote(kind))
    try:
        probe = ray.get_actor(ENCODER_PROBE)
    except ValueError:
        return
    ray.get(probe.record.remote(kind))


# ----------------------------------------------------------------------------- stages


def _stack_x(arrays: list[np.ndarray]) -> np.ndarray:
    """One (B, C, H, W) array, or, when the rows are buckets of different shapes, an object array of
    (C, h, w) arrays (Ray Data stores it as a variable-shaped tensor column)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays).astype(np.float32)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a.astype(np.float32)
    return out


def _batches(rows: dict[str, list], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Decoded rows -> numpy batches (nothing yielded for an empty list: an empty tensor column
    would not convert to Arrow). With buckets, each batch holds the rows of one bucket."""
    n = len(rows["row_id"])
    if "bucket" in rows:
        groups = [(b, [i for i in range(n) if rows["bucket"][i] == b]) for b in sorted(set(rows["bucket"]))]
    else:
        groups = [(None, list(range(n)))]
    for bucket, idx in groups:
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            batch = {
                "x": _stack_x([rows["x"][i] for i in part]),
                "caption": np.array([rows["caption"][i] for i in part], dtype=object),
                "label": np.array([rows["label"][i] for i in part], dtype=np.int64),
                "row_id": np.array([rows["row_id"][i] for i in part], dtype=object),
            }
            if bucket is not None:
                batch["bucket"] = np.full(len(part), bucket, dtype=np.int64)
            yield batch


def _decode_rows(items: list[dict[str, Any]], fs: Any, channels: int, resolution: int, stats: Any,
                 buckets: list[tuple[int, int]] | None = None) -> dict[str, list]:
    out: dict[str, list] = {"x": [], "caption": [], "label": [], "row_id": [], **({"bucket": []} if buckets else {})}
    rejected = []
    for item in items:
        try:
            if item.get("reason"):
                raise ImageProblem(item["reason"], item.get("detail", ""))
            data = item.get("data") or b""
            if not data:
                try:
                    data = fs.cat_file(item["path"])
                except FileNotFoundError:
                    raise ImageProblem("missing_file", f"'{item['file']}' does not exist") from None
                except OSError as exc:
                    raise ImageProblem("unreadable", f"cannot read '{item['file']}': {exc}") from None
            if buckets:
                img = load_image(data)
                bucket = nearest_bucket(img.size[0], img.size[1], buckets)
                x = prepare_image(img, channels, *buckets[bucket])
                out["bucket"].append(bucket)
            else:
                x = decode_image_bytes(data, channels, resolution)
        except ImageProblem as problem:
            rejected.append(reject(str(item["row_id"]), str(item.get("file") or ""), (problem.reason, str(problem))))
            continue
        out["x"].append(x)
        out["caption"].append(str(item["caption"]))
        out["label"].append(int(item["label"]))
        out["row_id"].append(str(item["row_id"]))
    if rejected:
        ray.get(stats.add_rejects.remote(rejected))
    return out


def _rows_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def decode_files(batch: dict[str, np.ndarray], *, fs: Any, channels: int, resolution: int, stats: Any, batch_size: int,
                 buckets: list[tuple[int, int]] | None = None) -> Iterator[dict[str, np.ndarray]]:
    yield from _batches(_decode_rows(_rows_of(batch), fs, channels, resolution, stats, buckets), batch_size)


def decode_parquet_fragments(batch: dict[str, np.ndarray], *, fs: Any, base: str, data_cfg: Any, channels: int, resolution: int, stats: Any,
                             batch_size: int, buckets: list[tuple[int, int]] | None = None) -> Iterator[dict[str, np.ndarray]]:
    for frag in _rows_of(batch):
        frag = {**frag, "columns": list(frag["columns"])}
        rows = read_parquet_fragment(fs, base, frag, data_cfg)
        for i in range(0, len(rows), batch_size):
            yield from _batches(_decode_rows(rows[i : i + batch_size], fs, channels, resolution, stats, buckets), batch_size)


def decode_digits(batch: dict[str, np.ndarray], *, channels: int, resolution: int) -> dict[str, np.ndarray]:
    """The built-in digits go through ``data/digits.py``'s own upscaling, so the cache holds exactly the
    pixels the in-memory path trains on."""
    from apexdistill.data.digits import upscale

    pixels = np.stack([np.asarray(p, dtype=np.float32) for p in batch["pixels"]]).reshape(-1, 8, 8)
    x = upscale(pixels, resolution).numpy()
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    return {"x": x, "caption": batch["caption"].astype(object), "label": batch["label"].astype(np.int64), "row_id": batch["row_id"].astype(object)}


def encode_text(encoder: Any, captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Captions -> (states (B, L, D) float32, mask (B, L) int64, truncated (B,) bool), with
    ``TextEncoder.encode`` run once per distinct caption in the batch."""
    unique, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    texts = [str(t) for t in unique]
    states, masks = encoder.encode(texts)
    too_long = np.array(encoder.truncated(texts), dtype=bool)
    return states.numpy()[inverse], masks.numpy()[inverse], too_long[inverse]


class TextEncodeStage:
    """Actor: holds the text encoder (a pipeline's own, or MiniLM), adds ``text`` and ``text_mask``
    to each batch; the first actor also hands the negative prompt's embedding to the stats actor."""

    def __init__(self, text_config: dict[str, Any], identity: str, device: str, stats: Any) -> None:
        from apexdistill.config import TextEncoderConfig
        from apexdistill.models.text import build_text_encoder

        cfg = TextEncoderConfig.model_validate(text_config)
        self.encoder = build_text_encoder(cfg)
        if self.encoder.identity != identity:  # the key was computed from config.json: it must match
            raise RuntimeError(f"text encoder identity {self.encoder.identity} differs from the cache key's {identity}")
        self.device = device
        self.encoder.to(device)
        self.stats = stats
        negative = self.encoder.encode_negative() if cfg.kind == "pipeline" else self.encoder.encode_negative(cfg.negative_prompt or "")
        ray.get(stats.set_negative.remote({"text": negative[0].float().cpu().numpy(), "text_mask": negative[1].long().cpu().numpy()}))
        _announce_encoder("text", stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        states, mask, truncated = encode_text(self.encoder, list(batch["caption"]))
        if truncated.any():
            ray.get(self.stats.add_truncated.remote([str(r) for r in batch["row_id"][truncated]]))
        self.stats.add_encoded.remote(len(batch["caption"]))
        out = {"x": batch["x"], "text": states, "text_mask": mask, "caption": batch["caption"], "label": batch["label"], "row_id": batch["row_id"]}
        if "bucket" in batch:
            out["bucket"] = batch["bucket"]
        return out


class VaeEncodeStage:
    """Actor: holds the VAE, replaces pixel ``x`` by latents (posterior mean, scaled)."""

    def __init__(self, path: str, channels: int, identity: str, device: str, stats: Any) -> None:
        from apexdistill.config import VaeConfig
        from apexdistill.models.vae import build_vae

        self.vae = build_vae(VaeConfig(path=path), channels)
        if self.vae.identity != identity:
            raise RuntimeError(f"VAE identity {self.vae.identity} differs from the cache key's {identity}")
        self.device = device
        self.vae.to(device)
        _announce_encoder("vae", stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = batch["x"]
        if x.dtype != object:  # one shape: the whole batch at once
            latents = self.vae.encode(torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device)).float().cpu().numpy()
            return {**batch, "x": latents}
        out = [None] * len(x)  # buckets of different shapes: one VAE call per shape
        for shape in {a.shape for a in x}:
            idx = [i for i, a in enumerate(x) if a.shape == shape]
            encoded = self.vae.encode(torch.from_numpy(np.stack([x[i] for i in idx]).astype(np.float32)).to(self.device)).float().cpu().numpy()
            for i, e in zip(idx, encoded):
                out[i] = e
        return {**batch, "x": _stack_x(out)}


# ----------------------------------------------------------------------------- pipeline


def check_resources(cfg: Config) -> None:
    """Refuse actor settings that would leave no CPU for the decode and write tasks (the pipeline
    would wait forever, RAY_NOTES.md)."""
    d = cfg.data
    total = float(ray.cluster_resources().get("CPU", 0.0))
    actors = d.text_actors * d.text_actor_cpus + (d.vae_actors * d.vae_actor_cpus if cfg.vae.path else 0.0)
    if actors + d.decode_cpus > total + 1e-9:
        vae = f" + data.vae_actors x data.vae_actor_cpus ({d.vae_actors} x {d.vae_actor_cpus})" if cfg.vae.path else ""
        raise ValueError(
            f"preprocess actors need data.text_actors x data.text_actor_cpus ({d.text_actors} x {d.text_actor_cpus}){vae} "
            f"= {actors:g} CPUs, plus data.decode_cpus={d.decode_cpus:g} for the decode tasks, but the Ray cluster has {total:g} CPUs; "
            "lower the actor counts or use fractional CPUs (e.g. 0.5)"
        )
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    want = d.text_actors * d.text_actor_gpus + (d.vae_actors * d.vae_actor_gpus if cfg.vae.path else 0.0)
    if want > gpus + 1e-9:
        raise ValueError(f"data.text_actor_gpus / data.vae_actor_gpus ask for {want:g} GPUs, the Ray cluster has {gpus:g}")


def build_dataset(cfg: Config, spec: CacheSpec, plan: SourcePlan, stats: Any, base: str = "") -> "ray.data.Dataset":
    """The lazy Ray Data pipeline from plan rows to cache rows (not executed here)."""
    d = cfg.data
    channels, res = d.image_channels, d.resolution
    per_block = 1 if plan.kind == "parquet" else d.batch_size
    blocks = max(1, min(math.ceil(len(plan.rows) / per_block), 1024))
    ds = ray.data.from_items(plan.rows, override_num_blocks=blocks)
    common = dict(batch_format="numpy", num_cpus=d.decode_cpus)
    if plan.kind == "digits":
        ds = ds.map_batches(decode_digits, batch_size=d.batch_size, fn_kwargs=dict(channels=channels, resolution=res), **common)
    elif plan.kind == "files":
        kw = dict(fs=plan.fs, channels=channels, resolution=res, stats=stats, batch_size=d.batch_size, buckets=spec.buckets)
        ds = ds.map_batches(decode_files, batch_size=d.batch_size, fn_kwargs=kw, **common)
    else:
        kw = dict(fs=plan.fs, base=base, data_cfg=d, channels=channels, resolution=res, stats=stats, batch_size=d.batch_size,
                  buckets=spec.buckets)
        ds = ds.map_batches(decode_parquet_fragments, batch_size=1, fn_kwargs=kw, **common)

    device = "cuda" if d.text_actor_gpus > 0 else "cpu"
    ds = ds.map_batches(
        TextEncodeStage, batch_size=d.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=d.text_actors), num_cpus=d.text_actor_cpus, num_gpus=d.text_actor_gpus or None,
        max_restarts=d.actor_max_restarts,
        fn_constructor_kwargs=dict(text_config=cfg.text_encoder.model_dump(mode="json"), identity=spec.text["identity"], device=device, stats=stats),
    )
    if cfg.vae.path:
        device = "cuda" if d.vae_actor_gpus > 0 else "cpu"
        ds = ds.map_batches(
            VaeEncodeStage, batch_size=d.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=d.vae_actors), num_cpus=d.vae_actor_cpus, num_gpus=d.vae_actor_gpus or None,
            max_restarts=d.actor_max_restarts,
            fn_constructor_kwargs=dict(path=spec.vae["path"], channels=channels, identity=spec.vae["identity"], device=device, stats=stats),
        )
    return ds


def _actor_death_line(cfg: Config, tag: str = "preprocess", stops: str = "publishes nothing") -> Callable[[int, str], None]:
    """What the console says when one of the build's Ray processes dies (an encoder actor killed, out of memory)."""
    restarts = cfg.data.actor_max_restarts

    def say(pid: int, exit_type: str) -> None:
        then = ("Ray Data restarts it and retries its rows" + (f" (data.actor_max_restarts={restarts})" if restarts > 0 else "")
                if restarts else f"the build stops and {stops} (data.actor_max_restarts=0)")
        print(f"[{tag}] a worker of the build died: {process_died(pid, exit_type)}; {then}", flush=True)

    return say


def _actor_died(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _progress_line(stats: Any, total: int, interval: float = 5.0, tag: str = "preprocess", verb: str = "encoded") -> Any:
    """A steady line while the Ray Data job runs: rows encoded, rows/s and ETA, every ``interval`` s."""
    from apexdistill.console import Periodic

    started = time.time()

    def report() -> None:
        try:
            done = int(ray.get(stats.progress.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - progress is best effort; the build itself reports errors
            return
        if done == 0:  # the actors are still loading their encoders
            return
        rate = done / max(time.time() - started, 1e-9)
        print(f"[{tag}] {verb} {done}/{total} rows | {rate:.{0 if rate >= 10 else 1}f} rows/s | ETA {(total - done) / rate:.0f}s", flush=True)

    return Periodic(report, interval)


def _write(ds: "ray.data.Dataset", store: CacheStore, tmp: str, decode_cpus: float) -> None:
    """``write_parquet`` into ``tmp/data``; for a process-local store (memory://) Ray writes to a
    local staging folder and the driver copies the files over."""
    write_kw = dict(min_rows_per_file=MIN_ROWS_PER_FILE, mode=ray.data.SaveMode.OVERWRITE, ray_remote_args={"num_cpus": min(1.0, decode_cpus)})
    target = posixpath.join(tmp, DATA)
    if worker_visible(store.fs):
        ds.write_parquet(target, filesystem=arrow_fs(store.fs), **write_kw)
        return
    with tempfile.TemporaryDirectory(prefix="apexdistill-stage-") as stage:
        ds.write_parquet(stage, **write_kw)
        store.fs.makedirs(target, exist_ok=True)
        for f in sorted(Path(stage).glob("*.parquet")):
            store.fs.put_file(str(f), posixpath.join(target, f.name))


def _data_files(fs: Any, folder: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Manifest entries for the written data files, and column shapes/dtypes from their schema."""
    import pyarrow.parquet as pq

    import ray.data  # noqa: F401  (registers Ray's tensor extension types for the schema below)

    files, columns = [], {}
    data_dir = posixpath.join(folder, DATA)
    names = sorted(n for n in fs.find(data_dir) if n.endswith(".parquet")) if fs.exists(data_dir) else []
    for name in names:
        with fs.open(name, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            if not columns:
                columns = _column_info(meta.schema.to_arrow_schema())
        files.append({"path": name[len(folder) + 1 :], "rows": meta.num_rows, "bytes": fs.info(name)["size"]})
    return files, columns


def _bucket_rows(fs: Any, folder: str, files: list[dict[str, Any]], n: int) -> list[int]:
    """Rows per bucket, from the written files' ``bucket`` column alone."""
    import pyarrow.parquet as pq

    counts = np.zeros(n, dtype=np.int64)
    for f in files:
        with fs.open(posixpath.join(folder, f["path"]), "rb") as fh:
            counts += np.bincount(pq.read_table(fh, columns=["bucket"]).column("bucket").to_numpy(), minlength=n)[:n]
    return counts.tolist()


def _column_info(schema: Any) -> dict[str, Any]:
    out = {}
    for fld in schema:
        typ = fld.type
        if getattr(typ, "extension_name", "").endswith("variable_shaped_tensor"):  # Ray's ragged tensor column (buckets)
            out[fld.name] = {"dtype": "float32", "shape": None}
        elif hasattr(typ, "shape") and hasattr(typ, "storage_type"):  # Ray's fixed-shape tensor column
            out[fld.name] = {"dtype": np.dtype(typ.storage_type.value_type.to_pandas_dtype()).name, "shape": list(typ.shape)}
        else:
            out[fld.name] = {"dtype": "str" if str(typ) in ("string", "large_string") else str(typ), "shape": []}
    return out


def _write_rejects(fs: Any, path: str, rejects: list[dict[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: pa.array([r.get(c, "") for r in rejects], type=pa.string()) for c in REJECT_COLUMNS})
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh)


def _write_negative(fs: Any, path: str, negative: dict[str, Any] | None, spec: CacheSpec) -> None:
    """The negative prompt's embedding, (1, L, D) and (1, L), next to the rows."""
    import torch
    from safetensors.torch import save

    if negative is None:
        raise RuntimeError("no text-encoder actor reported the negative prompt's embedding")
    text, mask = torch.from_numpy(np.array(negative["text"], dtype=np.float32)), torch.from_numpy(np.array(negative["text_mask"], dtype=np.int64))
    if list(text.shape[1:]) != spec.text_shape:
        raise RuntimeError(f"negative embedding {list(text.shape)} does not match the rows' text {spec.text_shape}")
    with fs.open(path, "wb") as fh:
        fh.write(save({"text": text.contiguous(), "text_mask": mask.contiguous()}, metadata={"prompt": str(spec.text.get("negative_prompt", ""))}))


def read_negative(uri: str) -> dict[str, Any]:
    """A cache's negative embedding: {"text": (1, L, D), "text_mask": (1, L)} tensors."""
    from safetensors.torch import load

    fs, folder, _ = _open_cache(uri)
    with fs.open(posixpath.join(folder, NEGATIVE), "rb") as fh:
        return load(fh.read())


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS or a local instance sized to the machine


def _summary_line(rows: int, rejected: int, total: int, truncated: int, max_length: int) -> str:
    share = 100.0 * rejected / max(1, total)
    return f"{rows} rows cached, {rejected} rejected ({share:.1f}%), {truncated} caption(s) truncated to {max_length} tokens"


def _info_from_manifest(store: CacheStore, key: str, manifest: dict[str, Any], hit: bool, seconds: float, encoders: int = 0) -> CacheInfo:
    folder = store.path(key)
    return CacheInfo(
        uri=store.to_uri(folder), key=key, hit=hit, rows=int(manifest["rows"]), rejected=int(manifest["rejected"]),
        truncated=int(manifest["truncated_captions"]), rejects_uri=store.to_uri(posixpath.join(folder, REJECTS)),
        manifest=manifest, seconds=seconds, encoder_actors=encoders,
    )


def _check_rejects(cfg: Config, store: CacheStore, spec: CacheSpec, rejects: list[dict[str, str]], total: int, rows_left: int) -> None:
    """Fail (writing the rejects where the user can read them, never into a cache folder) when no
    rows are left or the reject share is above ``data.max_reject_fraction``."""
    share = len(rejects) / max(1, total)
    if rows_left > 0 and share <= cfg.data.max_reject_fraction:
        return
    failed = store.path(f"failed-{spec.key}", REJECTS)
    _write_rejects(store.fs, failed, sorted(rejects, key=lambda r: r["row_id"]))
    reasons = ", ".join(f"{k}: {v}" for k, v in Counter(r["reason"] for r in rejects).most_common())
    why = "no usable rows left" if rows_left == 0 else f"above data.max_reject_fraction={cfg.data.max_reject_fraction:g}"
    raise PreprocessError(
        f"{len(rejects)} of {total} rows rejected ({100 * share:.1f}%), {why} ({reasons or 'no rejects'}); "
        f"see the rejects table {store.to_uri(failed)}; nothing was published"
    )


def find_cache(cfg: Config, source: Any, force: bool, started: float, tag: str = "preprocess",
               nothing: str = "nothing encoded") -> tuple[CacheSpec, CacheStore, CacheInfo | None]:
    """The key of ``source``'s cache, its store, and the complete cache already there (None: build it, or ``force``)."""
    spec = cache_spec(cfg, source)
    store = CacheStore(default_cache_uri(cfg))
    manifest = None if force else store.read_manifest(spec.key)
    if manifest is None:
        return spec, store, None
    info = _info_from_manifest(store, spec.key, manifest, hit=True, seconds=time.time() - started)
    print(f"[{tag}] cache hit: {info.uri} ({info.rows} rows; {nothing})", flush=True)
    return spec, store, info


def run_preprocess(cfg: Config, force: bool = False, *, on_written: Callable[[str], None] | None = None) -> CacheInfo:
    """Build (or find) the cache for ``cfg``. ``force`` rebuilds even when a complete cache exists;
    a failed rebuild leaves the old cache as it was.

    ``on_written(tmp_uri)`` runs after the data files are written and before the manifest: a hook
    for tests that simulate a crash in the writer step."""
    if cfg.data.source == "teacher":  # no images: the teacher writes the set (data/synthesize.py)
        from apexdistill.data.synthesize import run_synthesize

        return run_synthesize(cfg, force=force)
    started = time.time()
    source = build_source(cfg.data)
    spec, store, hit = find_cache(cfg, source, force, started)
    if hit is not None:
        return hit

    print(f"[preprocess] {'rebuilding (--force)' if force else 'building'}: {source.describe()} -> {store.to_uri(store.path(spec.key))}", flush=True)
    removed = store.cleanup_incomplete(spec.key)
    if removed:
        print(f"[preprocess] removed incomplete build(s): {', '.join(removed)}", flush=True)
    plan = source.plan()
    if plan.total_rows == 0:
        raise PreprocessError(f"data.path: the source {source.describe()} has no rows")
    # rows rejected on the driver (missing files, empty captions, paths outside the root) can fail the
    # job before any encoder starts
    _check_rejects(cfg, store, spec, plan.rejects, plan.total_rows, rows_left=len(plan.rows))
    _ensure_ray()
    check_resources(cfg)

    stats = _BuildStats.remote()
    tmp = store.new_tmp(spec.key)
    try:
        with _progress_line(stats, len(plan.rows)), on_worker_death(_actor_death_line(cfg)):
            _write(build_dataset(cfg, spec, plan, stats, base=getattr(source, "base", "")), store, tmp, cfg.data.decode_cpus)
        summary = ray.get(stats.summary.remote())
        rejects = sorted(plan.rejects + summary["rejects"], key=lambda r: r["row_id"])
        files, columns = _data_files(store.fs, tmp)
        rows, total = sum(f["rows"] for f in files), plan.total_rows
        reasons = dict(Counter(r["reason"] for r in rejects).most_common())
        print(f"[preprocess] {_summary_line(rows, len(rejects), total, summary['truncated'], spec.text['max_length'])}", flush=True)
        if reasons:
            print("[preprocess] rejects by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.items()), flush=True)
        _check_rejects(cfg, store, spec, rejects, total, rows_left=rows)
        bucket_rows = None
        if spec.buckets is not None:
            bucket_rows = _bucket_rows(store.fs, tmp, files, len(spec.buckets))
            columns["x"] = {"dtype": "float32", "shape": None}  # per bucket: the manifest's buckets[i].x_shape
            print("[preprocess] rows per bucket: " + ", ".join(f"{h}x{w} {n}" for (h, w), n in zip(spec.buckets, bucket_rows)), flush=True)
        elif columns.get("x", {}).get("shape") != spec.x_shape:
            raise RuntimeError(f"written columns {columns} do not match the expected x {spec.x_shape}")
        if columns.get("text", {}).get("shape") != spec.text_shape:
            raise RuntimeError(f"written columns {columns} do not match the expected text {spec.text_shape}")

        _write_rejects(store.fs, posixpath.join(tmp, REJECTS), rejects)
        _write_negative(store.fs, posixpath.join(tmp, NEGATIVE), ray.get(stats.get_negative.remote()), spec)
        if on_written is not None:
            on_written(store.to_uri(tmp))
        d = cfg.data
        manifest = build_manifest(
            spec, source=str(d.path or "builtin:digits"), rows=rows, rejected=len(rejects), truncated=summary["truncated"], files=files,
            columns=columns, reject_reasons=reasons, seconds=time.time() - started,
            settings={"resolution": d.resolution, "buckets": d.buckets, "channels": d.image_channels, "source": d.source, "limit": d.limit,
                      "max_reject_fraction": d.max_reject_fraction, "text_actors": d.text_actors, "vae_actors": d.vae_actors if cfg.vae.path else 0},
        )
        if spec.buckets is not None:
            manifest["buckets"] = bucket_table(spec.buckets, spec.bucket_x_shapes, bucket_rows)
        store.publish(tmp, spec.key, manifest)
    except BaseException as exc:
        store.discard(tmp)
        if _actor_died(exc):  # its own line said which process and why (_actor_death_line)
            raise PreprocessError(f"an encoder actor died and data.actor_max_restarts={cfg.data.actor_max_restarts}: the build "
                                  f"published nothing; run it again to rebuild, or set data.actor_max_restarts to restart a lost actor") from exc
        raise
    finally:
        ray.kill(stats)
    info = _info_from_manifest(store, spec.key, manifest, hit=False, seconds=time.time() - started, encoders=sum(summary["encoders"].values()))
    print(f"[preprocess] cache: {info.uri} (rejects: {info.rejects_uri}) in {info.seconds:.1f} s", flush=True)
    return info


# ----------------------------------------------------------------------------- reading


def _open_cache(uri: str) -> tuple[Any, str, dict[str, Any]]:
    fs, folder = open_fs(uri)
    manifest = read_complete_manifest(fs, folder)
    if manifest is None:
        raise FileNotFoundError(f"'{uri}' is not a complete preprocessing cache (no valid {posixpath.join(uri, 'manifest.json')}); run `apexdistill preprocess`")
    return fs, folder, manifest


def read_cache(uri: str, columns: Sequence[str] | None = TRAIN_COLUMNS) -> "ray.data.Dataset":
    """A cache folder (``CacheInfo.uri``) -> a Ray Dataset for ``TorchTrainer(datasets=...)``.

    By default only the tensor columns (``TRAIN_COLUMNS``), so ``iter_torch_batches`` works as is;
    ``columns=None`` keeps ``caption`` and ``row_id`` too. A cache on a process-local store
    (``memory://``) is read here and Ray ships the blocks. Small caches are better read with
    ``read_cache_tables`` (what training does): Ray Data's file-listing and read tasks take a whole
    CPU each, whatever ``ray_remote_args`` say, and workers holding most CPUs of a small machine
    would starve them."""
    fs, folder, manifest = _open_cache(uri)
    if worker_visible(fs):
        cols = _cache_columns(manifest, columns)
        with _parquet_footers_in_driver():
            ds = ray.data.read_parquet([posixpath.join(folder, f["path"]) for f in manifest["files"]], filesystem=arrow_fs(fs))
        return ds.select_columns(cols) if cols else ds
    return ray.data.from_arrow(_read_tables(fs, folder, manifest, columns))  # process-local store: the driver reads, Ray ships the blocks


@contextlib.contextmanager
def _parquet_footers_in_driver() -> Iterator[None]:
    """``read_parquet`` through Ray Data's first Parquet datasource for the duration of the call.

    Ray 2.60's default (``DataContext.use_datasource_v2``) lists the files by starting a pool of
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` (32) FooterReader actors per read, one process each, to read
    the footers. A cache's manifest names its few files, so that pool is pure start-up: measured on
    2 CPUs, reading the 1437-row digits cache took 5.2-6.6 s with it and 1.0-1.4 s without, and each
    read left 6 more worker processes behind. The flag is read when the dataset is built, so it is
    set only around that call and the caller's own reads keep Ray's default."""
    ctx = ray.data.DataContext.get_current()
    old = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = old


def _cache_columns(manifest: dict[str, Any], columns: Sequence[str] | None) -> list[str] | None:
    cols = list(columns) if columns is not None else None
    if cols is not None and manifest.get("buckets") and "bucket" not in cols:
        cols.append("bucket")  # training draws each batch from one bucket
    if cols is not None and "x" in cols and "z" in manifest["columns"] and "z" not in cols:
        cols.append("z")  # a synthesized cache: each x's initial noise (regression's stored pairs)
    return cols


def read_cache_tables(uri: str, columns: Sequence[str] | None = TRAIN_COLUMNS) -> list[Any]:
    """A cache folder read into this process with pyarrow: one table per file, in manifest order
    (the columns of ``read_cache``). No Ray Data task runs."""
    import ray.data  # noqa: F401  (registers Ray's tensor extension type so tensor columns convert)

    return _read_tables(*_open_cache(uri), columns)


def _read_tables(fs: Any, folder: str, manifest: dict[str, Any], columns: Sequence[str] | None) -> list[Any]:
    import pyarrow.parquet as pq

    cols = _cache_columns(manifest, columns)
    tables = []
    for f in manifest["files"]:
        with fs.open(posixpath.join(folder, f["path"]), "rb") as fh:
            tables.append(pq.read_table(fh, columns=cols))
    return tables


def distinct_captions(uri: str, limit: int, with_states: bool = False) -> list[dict[str, Any]]:
    """The first ``limit`` distinct captions of a cache, in file order, read with pyarrow in small
    batches (no Ray, stops as soon as it has them): [{"caption": ...}] or, ``with_states``, also their
    cached "text" (L, D) and "text_mask" (L,) arrays. Where sample grids and evaluation prompts come
    from: no text encoder is loaded."""
    import pyarrow.parquet as pq

    import ray.data  # noqa: F401  (registers Ray's tensor extension type so tensor columns convert)

    fs, folder, manifest = _open_cache(uri)
    columns = ["caption", "text", "text_mask"] if with_states else ["caption"]
    found: dict[str, dict[str, Any]] = {}
    for f in manifest["files"]:
        with fs.open(posixpath.join(folder, f["path"]), "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=64, columns=columns):
                arrays = {c: (batch.column(c).to_pylist() if c == "caption" else batch.column(c).to_numpy()) for c in columns}
                for i, caption in enumerate(arrays["caption"]):
                    if caption not in found:
                        found[caption] = {c: (str(caption) if c == "caption" else np.asarray(arrays[c][i])) for c in columns}
                    if len(found) == limit:
                        return list(found.values())
    return list(found.values())


def load_cache_tensors(uri: str) -> dict[str, Any]:
    """A (small) cache -> torch tensors in ``row_id`` order: x, text, text_mask, label (tensors), caption,
    row_id (lists), and z when the cache has it (a synthesized cache's noise). No Ray needed. With buckets,
    ``x`` is a list of (C, h, w) tensors (each row its bucket's shape) and ``bucket`` a tensor of bucket indices."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import ray.data  # noqa: F401  (registers Ray's tensor extension type so tensor columns convert)

    fs, folder, manifest = _open_cache(uri)
    tables = []
    for f in manifest["files"]:
        with fs.open(posixpath.join(folder, f["path"]), "rb") as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        raise ValueError(f"cache '{uri}' has no rows")
    table = pa.concat_tables(tables)
    row_ids = table.column("row_id").to_pylist()
    order = np.argsort(np.asarray(row_ids, dtype=object).astype(str), kind="stable")

    def tensor(name: str) -> torch.Tensor:
        col = table.column(name)
        arr = np.concatenate([chunk.to_numpy() for chunk in col.chunks]) if col.num_chunks else np.zeros(0)
        return torch.from_numpy(np.ascontiguousarray(arr[order]))

    captions = table.column("caption").to_pylist()
    out = {
        "text": tensor("text"), "text_mask": tensor("text_mask"), "label": tensor("label"),
        "caption": [captions[i] for i in order], "row_id": [row_ids[i] for i in order],
    }
    if "z" in table.column_names:  # a synthesized cache: each x's initial noise
        out["z"] = tensor("z")
    if manifest.get("buckets"):
        rows = [a for chunk in table.column("x").chunks for a in _tensor_rows(chunk)]
        out["x"] = [torch.from_numpy(np.ascontiguousarray(rows[i])) for i in order]
        out["bucket"] = tensor("bucket")
    else:
        out["x"] = tensor("x")
    return out


def _tensor_rows(chunk: Any) -> list[np.ndarray]:
    """One array per row of a tensor column chunk, fixed- or variable-shaped."""
    arr = chunk.to_numpy(zero_copy_only=False) if hasattr(chunk.type, "extension_name") and "variable" in chunk.type.extension_name else chunk.to_numpy()
    return [np.asarray(a) for a in arr]
