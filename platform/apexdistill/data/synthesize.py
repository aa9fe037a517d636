"""Data-free distillation: the teacher writes the training set (``data.source: teacher``), as Ray Data batch inference.

``apexdistill synthesize -c CONFIG`` (and ``train``/``preprocess`` when no complete cache exists) samples
``data.samples_per_prompt`` images of every prompt of ``data.prompts`` from the teacher in ``model.path``: its own
scheduler, CFG and ``teacher.nfe`` steps, exactly as the evaluation samples the teacher (``eval.quality.sample_row``),
each image from its own seeded noise. The rows are the preprocessing cache's (``data/preprocess.py``: ``x`` the
teacher's clean latent or pixels, ``text``/``text_mask`` the prompt's states from the pipeline's own encoder,
``caption``, ``label``, ``row_id``) plus ``z``, the initial noise each ``x`` was solved from: ``regression`` trains on
the stored ``(z, x)`` pairs (Direct Distill) and every other objective takes ``x`` as its data.

Pipeline::

    shards (prompts x samples, data.shard_rows rows each)
      --> map_batches on an actor pool of teacher actors (data.actors; a GPU each on a cluster)
      --> the driver commits each finished shard: CACHE_URI/.partial-<key>/data/shard-NNNNN.parquet, then its
          sidecar shard-NNNNN.json (the commit mark: rows, rejects, truncated prompts)
      --> when every shard is there: rejects.parquet, manifest.json (last) --> published as CACHE_URI/<key>/

The key hashes the teacher (its transformer's weights, the family, the scheduler and its config, the steps and the
guidance), the prompt set's hash, ``samples_per_prompt`` and ``data.seed``, the text encoder and the VAE (as for
preprocessing). A killed driver or actor loses at most the shards in flight: the rerun finds the committed shards
in the partial folder and samples only the others. Every image's noise comes from its own seed and a shard is
sampled in the same batches whoever samples it, so a resumed build is the uninterrupted one, row for row. A failed
build publishes nothing (the partial folder is not a cache; a changed ``data.shard_rows`` or ``data.batch_size``
starts it over). Rows whose sample is not finite are rejected, as unusable images are in preprocessing.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from apexdistill.config import Config
from apexdistill.console import on_worker_death
from apexdistill.data.cache import DATA, NEGATIVE, REJECTS, CacheSpec, CacheStore, _folder_digest, build_manifest
from apexdistill.data.digits import CAPTIONS

SYNTH_VERSION = 1  # bump when the sampling of a row changes: old synthesized caches stop matching
PLAN = "plan.json"
META_COLUMNS = ("shard", "index", "finite", "truncated")  # what an actor adds for the driver; not cached


@dataclass(frozen=True)
class SynthesisPrompts:
    prompts: tuple[str, ...]
    labels: tuple[int, ...]  # the digit of builtin:digits' captions, else -1
    source: str
    hash: str


def synthesis_prompts(cfg: Config) -> SynthesisPrompts:
    """``data.prompts`` read and checked (a missing or empty file is an error naming the field, before any compute)."""
    from apexdistill.eval.prompts import load_prompt_set, prompt_set_from_list

    spec = cfg.data.prompts or ("builtin:compositional" if cfg.text_encoder.kind == "pipeline" else "builtin:digits")
    if spec in ("builtin:digits", "digits"):
        ps, labels = prompt_set_from_list(CAPTIONS, "builtin:digits"), tuple(range(10))
    else:
        ps = load_prompt_set(spec, field="data.prompts")
        labels = (-1,) * len(ps)
    return SynthesisPrompts(ps.prompts, labels, spec, ps.hash)


def teacher_steps(cfg: Config) -> int:
    return int(cfg.teacher.nfe or cfg.eval.teacher_nfe)


def sampler_record(cfg: Config) -> dict[str, Any]:
    """How the teacher samples (part of the key): the family, the scheduler class and its config (a pipeline), or the
    digits' Euler ODE, the steps and the guidance."""
    from apexdistill.eval.quality import teacher_guidance

    out: dict[str, Any] = {"family": cfg.model.backbone, "steps": teacher_steps(cfg), "guidance_scale": teacher_guidance(cfg)}
    if cfg.text_encoder.kind == "pipeline":
        from apexdistill.models.family import read_model_index

        folder = Path(cfg.model.path)
        index = read_model_index(folder) or {}
        if "scheduler" not in index:
            raise ValueError(f"model.path: '{folder}' has no scheduler in its model_index.json (not a stock pipeline folder)")
        conf = folder / "scheduler" / "scheduler_config.json"
        out["scheduler"] = {"class": index["scheduler"][1], "config": json.loads(conf.read_text()) if conf.is_file() else None}
    else:
        out["scheduler"] = "euler"
    return out


class TeacherSource:
    """The ``Source`` of a synthesized cache: its fingerprint for the key (no file is listed, no model loaded)."""

    kind = "teacher"

    def __init__(self, cfg: Config) -> None:
        from apexdistill.assets import resolve_model_path
        from apexdistill.models.build import resolve_transformer_folder

        self.cfg = cfg
        self.prompts = synthesis_prompts(cfg)
        self.transformer = resolve_transformer_folder(resolve_model_path(cfg.model.path))  # not a pipeline: a clear error
        self.sampler = sampler_record(cfg)

    @property
    def rows(self) -> int:
        return len(self.prompts.prompts) * self.cfg.data.samples_per_prompt

    def describe(self) -> str:
        s = self.sampler
        return (f"teacher {self.cfg.model.path} ({s['steps']} steps, guidance {s['guidance_scale']:g}) x "
                f"{len(self.prompts.prompts)} prompts ({self.prompts.source}) x {self.cfg.data.samples_per_prompt} samples")

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "teacher", "version": SYNTH_VERSION, "teacher": _folder_digest(self.transformer), "sampler": self.sampler,
                "prompts": self.prompts.hash, "prompt_count": len(self.prompts.prompts),
                "samples_per_prompt": self.cfg.data.samples_per_prompt, "seed": self.cfg.data.seed}


# ----------------------------------------------------------------------------- the actor


def row_cell(i: int, samples_per_prompt: int) -> tuple[int, int]:
    """Row ``i`` of the set is (prompt, sample): prompt-major."""
    return i // samples_per_prompt, i % samples_per_prompt


class TeacherSampleStage:
    """Ray Data actor: holds the teacher, its text encoder and the negative prompt's states; samples whole shards in
    sub-batches of ``data.batch_size`` (fixed by the shard, not by Ray Data's batching), one output batch each."""

    def __init__(self, cfg_json: dict[str, Any], prompts: list[str], labels: list[int], x_shape: list[int], identity: str,
                 device: str, stats: Any) -> None:
        import ray
        import torch

        from apexdistill.data.preprocess import _announce_encoder
        from apexdistill.eval.quality import _disabled_lora
        from apexdistill.models.build import build_backbone
        from apexdistill.models.text import build_text_encoder

        self.cfg = Config.model_validate(cfg_json)
        self.prompts, self.labels, self.x_shape = list(prompts), list(labels), tuple(int(v) for v in x_shape)
        self.device = torch.device(device)
        self.encoder = build_text_encoder(self.cfg.text_encoder)
        if self.encoder.identity != identity:
            raise RuntimeError(f"text encoder identity {self.encoder.identity} differs from the cache key's {identity}")
        self.encoder.to(self.device).eval()
        self.teacher = build_backbone(_disabled_lora(self.cfg.model), self.x_shape[0], self.x_shape[-1], int(self.encoder.dim))
        self.teacher.to(self.device).eval().requires_grad_(False)
        te = self.cfg.text_encoder
        negative = self.encoder.encode_negative() if te.kind == "pipeline" else self.encoder.encode_negative(te.negative_prompt or "")
        self.negative = tuple(v.to(self.device) for v in negative)
        self.stats = stats
        ray.get(stats.set_negative.remote({"text": negative[0].float().cpu().numpy(), "text_mask": negative[1].long().cpu().numpy()}))
        _announce_encoder("teacher", stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for shard, start, end in zip(batch["shard"], batch["start"], batch["end"]):
            for b0 in range(int(start), int(end), self.cfg.data.batch_size):
                yield self._sample(int(shard), int(start), range(b0, min(b0 + self.cfg.data.batch_size, int(end))))

    def _sample(self, shard: int, start: int, rows: range) -> dict[str, np.ndarray]:
        import torch

        from apexdistill.data.preprocess import encode_text
        from apexdistill.eval.quality import image_seed, sample_row

        d = self.cfg.data
        cells = [row_cell(i, d.samples_per_prompt) for i in rows]
        seeds = [image_seed(d.seed, 0, p, k) for p, k in cells]
        captions = [self.prompts[p] for p, _ in cells]
        states, mask, truncated = encode_text(self.encoder, captions)
        z = torch.stack([torch.randn(self.x_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        text, text_mask = torch.from_numpy(states).to(self.device), torch.from_numpy(mask).to(self.device)
        torch.manual_seed(seeds[0] + 1)  # families whose pipelines re-noise from the global RNG
        with torch.no_grad():
            x = sample_row(self.cfg, self.teacher, z.to(self.device), text, text_mask, teacher_steps(self.cfg), True,
                           torch.Generator(device=self.device).manual_seed(seeds[0] + 1), self.negative).float().cpu()
        self.stats.add_encoded.remote(len(cells))
        return {
            "shard": np.full(len(cells), shard, dtype=np.int64), "index": np.asarray([i - start for i in rows], dtype=np.int64),
            "finite": torch.isfinite(x).flatten(1).all(1).numpy(), "truncated": np.asarray(truncated, dtype=bool),
            "x": x.numpy().astype(np.float32), "z": z.numpy().astype(np.float32), "text": states.astype(np.float32),
            "text_mask": mask.astype(np.int64), "caption": np.asarray(captions, dtype=object),
            "label": np.asarray([self.labels[p] for p, _ in cells], dtype=np.int64),
            "row_id": np.asarray([f"{p:06d}-{k:04d}" for p, k in cells], dtype=object),
        }


# ----------------------------------------------------------------------------- the driver


def shard_ranges(rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, rows)) for s in range(0, rows, shard_rows)]


class PartialBuild:
    """The partial folder of one key: which shards are committed, and committing one (parquet, then its sidecar)."""

    def __init__(self, store: CacheStore, spec: CacheSpec, plan: dict[str, Any]) -> None:
        self.store, self.fs, self.plan = store, store.fs, plan
        self.folder = store.path(f".partial-{spec.key}")

    def open(self, force: bool) -> str | None:
        """Make the folder ready; returns why an existing one was started over (None when it was kept or new)."""
        why = None
        plan_path = posixpath.join(self.folder, PLAN)
        if self.fs.exists(self.folder):
            try:
                old = json.loads(self.fs.cat_file(plan_path))
            except (OSError, ValueError):
                old = None
            if force:
                why = "--force"
            elif old != self.plan:
                changed = sorted(k for k in self.plan if (old or {}).get(k) != self.plan[k])
                why = f"its plan differs ({', '.join(changed) or 'unreadable'})"
            if why:
                self.fs.rm(self.folder, recursive=True)
        self.fs.makedirs(posixpath.join(self.folder, DATA), exist_ok=True)
        if not self.fs.exists(plan_path):
            self.store.write_json(plan_path, self.plan)
        for name in self.fs.ls(posixpath.join(self.folder, DATA), detail=False):  # a shard cut off mid-write
            if name.endswith(".part"):
                self.fs.rm(name)
        return why

    def _name(self, shard: int, ext: str) -> str:
        return posixpath.join(self.folder, DATA, f"shard-{shard:05d}.{ext}")

    def record(self, shard: int) -> dict[str, Any] | None:
        """The committed shard's sidecar, or None (absent, unreadable, or its Parquet file is not the size it says)."""
        try:
            rec = json.loads(self.fs.cat_file(self._name(shard, "json")))
            if self.fs.info(self._name(shard, "parquet"))["size"] != rec["bytes"]:
                return None
            return rec
        except (OSError, ValueError, KeyError):
            return None

    def commit(self, shard: int, table: Any, rejects: list[dict[str, str]], truncated: int) -> int:
        import pyarrow.parquet as pq

        path = self._name(shard, "parquet")
        with self.fs.open(path + ".part", "wb") as fh:
            pq.write_table(table, fh)
        self.fs.mv(path + ".part", path)
        size = int(self.fs.info(path)["size"])
        tmp = self._name(shard, "json.part")
        self.store.write_json(tmp, {"shard": shard, "rows": table.num_rows, "bytes": size, "rejects": rejects, "truncated": truncated})
        self.fs.mv(tmp, self._name(shard, "json"))
        return size

    def has_negative(self) -> bool:
        return self.fs.exists(posixpath.join(self.folder, NEGATIVE))


def _shard_table(blocks: list[Any]) -> tuple[Any, list[dict[str, str]], int]:
    """A shard's output blocks -> its cached rows in index order (non-finite samples left out), its rejects and the
    number of truncated prompts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from apexdistill.data.sources import reject

    table = pa.concat_tables(blocks)
    table = table.take(pc.sort_indices(table, [("index", "ascending")]))
    finite = table.column("finite").to_numpy(zero_copy_only=False)
    rejects = [reject(str(r), "", ("non_finite", "the teacher's sample has NaN or inf values"))
               for r, ok in zip(table.column("row_id").to_pylist(), finite) if not ok]
    truncated = int(np.sum(table.column("truncated").to_numpy(zero_copy_only=False)))
    kept = table.filter(pa.array(finite)).drop_columns(list(META_COLUMNS))
    return kept, rejects, truncated


def check_synthesis_resources(cfg: Config) -> None:
    import ray

    d = cfg.data
    cpus, gpus = float(ray.cluster_resources().get("CPU", 0.0)), float(ray.cluster_resources().get("GPU", 0.0))
    if d.actors * d.actor_cpus > cpus + 1e-9:
        raise ValueError(f"data.actors x data.actor_cpus = {d.actors} x {d.actor_cpus:g} CPUs, but the Ray cluster has {cpus:g}: "
                         "lower data.actors or use fractional CPUs (e.g. 0.5)")
    if d.actors * d.actor_gpus > gpus + 1e-9:
        raise ValueError(f"data.actors x data.actor_gpus = {d.actors} x {d.actor_gpus:g} GPUs, but the Ray cluster has {gpus:g}")


def run_synthesize(cfg: Config, force: bool = False) -> Any:
    """Build (or find, or resume) the synthesized cache of ``cfg`` (``data.source: teacher``); a ``CacheInfo``."""
    from apexdistill.data.preprocess import (
        CacheInfo, PreprocessError, _actor_death_line, _actor_died, _BuildStats, _check_rejects, _data_files, _ensure_ray,
        _info_from_manifest, _progress_line, find_cache, _summary_line, _write_negative, _write_rejects)

    if cfg.data.source != "teacher":
        raise ValueError(f"data.source is '{cfg.data.source}': set data.source=teacher to synthesize the training set from the teacher")
    started = time.time()
    source = TeacherSource(cfg)  # prompts read, teacher folder checked: errors before any compute
    spec, store, hit = find_cache(cfg, source, force, started, "synthesize", "nothing sampled")
    if hit is not None:
        return hit

    d = cfg.data
    total = source.rows
    ranges = shard_ranges(total, d.shard_rows)
    partial = PartialBuild(store, spec, {"key": spec.key, "rows": total, "shard_rows": d.shard_rows, "batch_size": d.batch_size})
    why = partial.open(force)
    done = {s for s in range(len(ranges)) if partial.record(s) is not None}
    todo = [s for s in range(len(ranges)) if s not in done]
    where = store.to_uri(store.path(spec.key))
    if done:
        rows_done = sum(ranges[s][1] - ranges[s][0] for s in done)
        print(f"[synthesize] resuming {source.describe()} -> {where}: {len(done)} of {len(ranges)} shards ({rows_done} rows) "
              f"already written in {store.to_uri(partial.folder)}", flush=True)
    else:
        print(f"[synthesize] building{' again (' + why + ')' if why else ''}: {source.describe()} = {total} rows in "
              f"{len(ranges)} shard(s), {d.actors} teacher actor(s) -> {where}", flush=True)

    sampled = actors_started = 0
    steady = None  # rows/s of the sampling alone, from the first sampled batch on (the actors' start-up left out)
    if todo:
        import ray

        _ensure_ray()
        check_synthesis_resources(cfg)
        stats = _BuildStats.remote()
        try:
            ds = ray.data.from_items([{"shard": s, "start": ranges[s][0], "end": ranges[s][1]} for s in todo],
                                     override_num_blocks=len(todo))
            ds = ds.map_batches(
                TeacherSampleStage, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=d.actors),
                num_cpus=d.actor_cpus, num_gpus=d.actor_gpus or None, max_restarts=d.actor_max_restarts,
                fn_constructor_kwargs=dict(cfg_json=cfg.model_dump(mode="json"), prompts=list(source.prompts.prompts),
                                           labels=list(source.prompts.labels), x_shape=spec.x_shape, identity=spec.text["identity"],
                                           device="cuda" if d.actor_gpus > 0 else "cpu", stats=stats))
            import pyarrow as pa

            pending: dict[int, list[Any]] = {}
            first, first_rows = None, 0
            seen: dict[int, set[int]] = {}
            with _progress_line(stats, total - sum(ranges[s][1] - ranges[s][0] for s in done), tag="synthesize", verb="sampled"), \
                    on_worker_death(_actor_death_line(cfg, "synthesize", "publishes nothing; a rerun resumes from the committed shards")):
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if first is None:  # the first sampled batch: the actors are loaded, the rest is sampling
                        first, first_rows = time.time(), block.num_rows
                    shards, index = block.column("shard").to_numpy(), block.column("index").to_numpy()
                    for shard in np.unique(shards):
                        s = int(shard)
                        # a task Ray Data retried after its actor died yields the rows it had yielded again: once each
                        fresh = (shards == shard) & np.asarray([int(i) not in seen.setdefault(s, set()) for i in index])
                        if not fresh.any():
                            continue
                        part = block.filter(pa.array(fresh))
                        seen[s].update(int(i) for i in index[fresh])
                        pending.setdefault(s, []).append(part)
                        if len(seen[s]) == ranges[s][1] - ranges[s][0]:
                            if not partial.has_negative():  # before the first shard: a committed shard implies it is there
                                _write_negative(store.fs, posixpath.join(partial.folder, NEGATIVE), ray.get(stats.get_negative.remote()), spec)
                            table, rejects, truncated = _shard_table(pending.pop(s))
                            partial.commit(s, table, rejects, truncated)
                            sampled += len(seen[s])
            actors_started = sum(ray.get(stats.summary.remote())["encoders"].values())
            if first is not None and sampled > first_rows:
                steady = (sampled - first_rows) / max(time.time() - first, 1e-9)
        except BaseException as exc:
            if _actor_died(exc):
                raise PreprocessError(f"a teacher actor died and data.actor_max_restarts={d.actor_max_restarts}: nothing was "
                                      f"published; run it again to resume from the {len(done)}+ committed shards in "
                                      f"{store.to_uri(partial.folder)}, or set data.actor_max_restarts") from exc
            raise
        finally:
            ray.kill(stats)

    records = [partial.record(s) for s in range(len(ranges))]
    missing = [s for s, r in enumerate(records) if r is None]
    if missing:
        raise PreprocessError(f"synthesis ended with shard(s) {missing[:10]} not written; run it again to resume; nothing was published")
    rejects = sorted((r for rec in records for r in rec["rejects"]), key=lambda r: r["row_id"])
    truncated = sum(int(rec["truncated"]) for rec in records)
    files, columns = _data_files(store.fs, partial.folder)
    rows = sum(f["rows"] for f in files)
    print(f"[synthesize] {_summary_line(rows, len(rejects), total, truncated, spec.text['max_length'])}", flush=True)
    _check_rejects(cfg, store, spec, rejects, total, rows_left=rows)
    if columns.get("x", {}).get("shape") != spec.x_shape or columns.get("z", {}).get("shape") != spec.x_shape:
        raise RuntimeError(f"written columns {columns} do not match the expected x and z {spec.x_shape}")
    if columns.get("text", {}).get("shape") != spec.text_shape:
        raise RuntimeError(f"written columns {columns} do not match the expected text {spec.text_shape}")
    _write_rejects(store.fs, posixpath.join(partial.folder, REJECTS), rejects)
    for extra in [PLAN] + [f"{DATA}/shard-{s:05d}.json" for s in range(len(ranges))]:  # the build's own records
        store.fs.rm(posixpath.join(partial.folder, extra))
    seconds = time.time() - started
    manifest = build_manifest(
        spec, source=f"teacher:{cfg.model.path}", rows=rows, rejected=len(rejects), truncated=truncated, files=files, columns=columns,
        reject_reasons=dict(Counter(r["reason"] for r in rejects)), seconds=seconds,
        settings={"resolution": d.resolution, "channels": d.image_channels, "source": "teacher", "prompts": source.prompts.source,
                  "prompt_count": len(source.prompts.prompts), "samples_per_prompt": d.samples_per_prompt, "seed": d.seed,
                  "sampler": source.sampler, "actors": d.actors, "shard_rows": d.shard_rows, "batch_size": d.batch_size,
                  "rows_sampled_by_this_build": sampled, "sampling_rows_per_s": steady, "max_reject_fraction": d.max_reject_fraction})
    manifest["bytes_per_row"] = round(sum(f["bytes"] for f in files) / max(1, rows), 1)
    store.publish(partial.folder, spec.key, manifest)
    info: CacheInfo = _info_from_manifest(store, spec.key, manifest, hit=False, seconds=seconds, encoders=actors_started)
    rate = f", {sampled / seconds:.1f} rows/s overall" if sampled else ""
    rate += f" ({steady:.1f} rows/s once the actors were up)" if steady else ""
    print(f"[synthesize] cache: {info.uri} ({rows} rows, {manifest['bytes_per_row']:.0f} bytes a row) in {seconds:.1f} s{rate}", flush=True)
    return info

