"""The training recipe: one Ray Train worker function that owns the loop top to bottom.

``train_loop_per_worker(loop_config)`` builds the data, the backbone, the objective and the
parallel strategy (``train.strategy``: none, ddp, fsdp2, deepspeed), resumes from
``ray.train.get_checkpoint()`` when there is one, trains, logs to MLflow from rank 0, and reports
metrics and checkpoints with ``ray.train.report``. ``TorchTrainer`` runs it in local mode
(``num_workers=0``, in the driver process) or on N workers; a sweep trial with no workers runs it in
the trial's own process and reports to Ray Tune (``train/session.py``); the loop is the same.

Checkpoints are written by every rank into one folder (each rank its RNG state, sharded strategies
their shards), published with an atomic rename by rank 0, and reported to Ray, which copies them to
``RunConfig.storage_path``; Ray's copy is what a restarted worker group resumes from. With
``run.storage_uri`` they are published on object storage instead (``train/storage.py``: each rank
uploads its files, rank 0 writes the manifest last) and Ray gets a pointer to the published folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from apexdistill.config import Config
from apexdistill.method.base import build_objective
from apexdistill.models.build import build_backbone
from apexdistill.train.data import DataShapes, shard_batches
from apexdistill.train.faults import restart_line, stop_requested
from apexdistill.train.session import RayTrainSession
from apexdistill.train.storage import RunStorage, publish_remote, write_pointer
from apexdistill.train.strategy import Strategy, barrier, build_strategy, distributed

CHECKPOINT_STATE = "trainer_state.json"
FAULT_MARKER = ".injected_failure"


class InjectedFailure(RuntimeError):
    """Raised once by ``train.fail_at_step`` (a drill for fault tolerance)."""


#: quiet mode: rank 0's progress lines are appended here and the driver prints them (console.ProgressRelay)
_PROGRESS: dict[str, Path | None] = {"file": None}


def _log(rank: int, msg: str) -> None:
    if rank != 0:
        return
    path = _PROGRESS["file"]
    if path is None:
        print(msg, flush=True)
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(msg + "\n")


def lr_factor(cfg: Config, step: int) -> float:
    """Linear warm-up, then constant or cosine to zero at ``train.steps``."""
    warm = cfg.train.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.train.schedule == "cosine":
        progress = (step - warm) / max(1, cfg.train.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def run_identity(cfg: Config) -> dict[str, Any]:
    """What must not change between a run and its resumption (the schedule and budget may)."""
    parallel: dict[str, Any] = {"strategy": cfg.train.strategy}
    if cfg.train.strategy == "deepspeed":  # ZeRO's partitioned optimizer states are per world size
        parallel.update(workers=cfg.train.num_workers, stage=cfg.train.deepspeed.stage)
    return {"objective": cfg.objective.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
            "data": {"source": cfg.data.source, "path": cfg.data.path, "resolution": cfg.data.resolution,
                     **({"buckets": cfg.data.model_dump(mode="json")["buckets"]} if cfg.data.buckets is not None else {})},
            "text_encoder": cfg.text_encoder.model_dump(mode="json"), "vae": cfg.vae.model_dump(mode="json"),
            "parallel": parallel}


def check_resumable(state: dict[str, Any], cfg: Config, folder: Path) -> None:
    saved = state.get("identity")
    if saved is None or saved == run_identity(cfg):
        return
    now = run_identity(cfg)
    changed = sorted(f"{sec}.{k}" for sec in now for k in set(now[sec]) | set(saved.get(sec, {}))
                     if now[sec].get(k) != saved.get(sec, {}).get(k))
    raise ValueError(
        f"run.name='{cfg.run.name}' already has a checkpoint ({folder}) trained with a different setup "
        f"(changed: {', '.join(changed)}); use a new run.name, or delete the run folder to start over"
    )


# ----------------------------------------------------------------------------- checkpoint folders


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _broadcast(value: Any) -> Any:
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def publish_checkpoint(run_dir: Path, step: int, write: Any, keep: int = 2, rank: int = 0) -> Path:
    """Every rank calls ``write(tmp)`` on one hidden temp folder; rank 0 then renames it into place,
    so a crash never leaves a complete-looking checkpoint. Old ones beyond ``keep`` are pruned."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    tmp = Path(_broadcast(tmp))
    try:
        write(tmp)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in checkpoint_root(run_dir).glob("step_*") if (p / CHECKPOINT_STATE).is_file())
    return done[-1] if done else None


def find_resume_checkpoint(run_dir: Path, session: Any) -> Any:
    """Ray's checkpoint on a restarted run; in local mode (no Ray storage) the run folder's latest."""
    ckpt = session.get_checkpoint()
    if ckpt is not None:
        return ckpt
    local = latest_checkpoint(run_dir)
    return session.checkpoint(local) if local is not None else None


@contextlib.contextmanager
def resume_checkpoint(run_dir: Path, session: Any, storage: Any = None) -> Any:
    """(local folder, where it came from) of the checkpoint to resume from, or None. On object storage
    Ray's checkpoint is a pointer to a published step folder; when that folder is gone or incomplete
    (pruned, a publish that died), or Ray has none, the newest complete one on the storage counts."""
    import posixpath

    from apexdistill.train.storage import POINTER

    if storage is None:
        ckpt = find_resume_checkpoint(run_dir, session)
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as folder:
            yield Path(folder), ckpt.path
        return
    target = None
    ckpt = session.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            pointer = Path(folder) / POINTER
            if pointer.is_file():
                uri = json.loads(pointer.read_text())["uri"]
                candidate = posixpath.join(storage.base, uri[len(storage.uri.rstrip("/")) + 1 :])
                target = candidate if storage.read_manifest(candidate) is not None else None
    target = target or storage.latest()
    if target is None:
        yield None
        return
    local = Path(tempfile.mkdtemp(prefix="apexdistill-resume-"))
    try:
        yield storage.fetch(target, local), storage.to_uri(target)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def save_rank_state(folder: Path, rank: int, batches: Any) -> None:
    """Each rank's random streams: its noise (torch, CUDA) and its data sampler."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    generator = getattr(batches, "generator", None)
    if generator is not None:
        state["batches"] = generator.get_state()
    save_file(state, str(folder / _rng_file(rank)))


def load_rank_state(folder: Path, rank: int) -> Any:
    path = folder / _rng_file(rank)
    if not path.is_file():
        return None
    state = load_file(str(path))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return state.get("batches")


def write_checkpoint(folder: Path, strategy: Strategy, batches: Any, trainer_state: dict[str, Any], final: bool) -> None:
    strategy.save(folder, final=final)
    save_rank_state(folder, strategy.rank, batches)
    barrier()
    if strategy.rank == 0:  # last: a folder without it is never treated as a checkpoint
        (folder / CHECKPOINT_STATE).write_text(json.dumps(trainer_state, indent=2))


# ----------------------------------------------------------------------------- the loop


def _should_stop(cfg: Config, started: float, trained_seconds: float) -> bool:
    """The time budget is decided on rank 0 and shared, so every rank stops at the same step."""
    if cfg.train.max_minutes is None:
        return False
    stop = torch.tensor([float(trained_seconds + time.time() - started > 60 * cfg.train.max_minutes)])
    if distributed():
        dist.broadcast(stop, src=0)
    return bool(stop.item())


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _device(cfg: Config, session: Any) -> torch.device:
    if not cfg.train.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu=true but this worker sees no CUDA device")
    return session.cuda_device()


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _maybe_fail(cfg: Config, step: int, rank: int, world: int, run_dir: Path) -> None:
    """``train.fail_at_step``: the last rank raises once (a marker in the run folder remembers it)."""
    marker = run_dir / FAULT_MARKER
    if cfg.train.fail_at_step != step or rank != world - 1 or marker.exists():
        return
    marker.write_text(json.dumps({"step": step, "rank": rank, "time": time.time()}))
    raise InjectedFailure(f"train.fail_at_step={step}: injected failure on rank {rank} (a drill; the run restarts from its last checkpoint)")


class SampleLogger:
    """Fixed prompts and seeds, sampled at ``tracking.sample_nfe`` and logged as an MLflow image series."""

    def __init__(self, cfg: Config, loop_config: dict[str, Any], device: torch.device, logger: Any, channels: int, resolution: int) -> None:
        self.cfg, self.logger, self.device = cfg, logger, device
        prompts = loop_config.get("sample_prompts")
        self.enabled = bool(prompts)
        if not self.enabled:
            return
        self.text = torch.tensor(prompts["text"], dtype=torch.float32)
        self.mask = torch.tensor(prompts["mask"], dtype=torch.float32)
        self.per_prompt = 4
        g = torch.Generator().manual_seed(cfg.eval.seed)
        n = self.text.shape[0] * self.per_prompt
        self.z = torch.randn((n, channels, resolution, resolution), generator=g)
        self.vae = None
        if cfg.vae.path and logger is not None:  # latent samples are logged as pictures, decoded by the VAE
            from apexdistill.models.vae import build_vae

            self.vae = build_vae(cfg.vae, cfg.data.image_channels).to(device)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> None:
        """Every rank runs the sampler (sharded models need all ranks for a forward); rank 0 logs."""
        if not self.enabled:
            return
        from apexdistill.eval.grid import image_grid_array
        from apexdistill.method.sampler import sample_few_step

        was_training = model.training
        model.eval()
        text = self.text.repeat_interleave(self.per_prompt, 0).to(self.device)
        mask = self.mask.repeat_interleave(self.per_prompt, 0).to(self.device)
        images = sample_few_step(model, self.z.to(self.device), text, mask, nfe=self.cfg.tracking.sample_nfe,
                                 generator=torch.Generator().manual_seed(self.cfg.eval.seed))
        model.train(was_training)
        if self.logger is not None:
            if self.vae is not None:
                images = self.vae.decode(images).clamp(-1, 1)
            grid = image_grid_array(images.float().cpu(), nrow=self.per_prompt * 2 if self.text.shape[0] % 2 == 0 else self.per_prompt)
            self.logger.log_image(grid, key=f"samples_{self.cfg.tracking.sample_nfe}nfe", step=step)


def _quiet_report_lines() -> None:
    """Ray Train V2 logs every ``ray.train.report`` call at INFO, with all metrics, on every rank."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # that logger is named by file
    except ImportError:
        pass


class InTrainingEval:
    """``eval.every``: scores during training, reported with the step's metrics (what ASHA stops trials on). EMA
    weights for ``none``/``ddp``; the live sharded weights for ``fsdp2``/``deepspeed`` (every rank runs the sampler,
    rank 0's scores count).

    On the built-in digits: 1-NFE prompt accuracy and FD proxy. Otherwise, with a teacher in ``model.path``: the
    1-NFE FD to the teacher and the diversity ratio (``eval/fd_teacher_1nfe``, ``eval/diversity_1nfe``) in the
    weight-free latent space, on the fixed prompts' states and ``eval.during_samples_per_class`` images each: the
    full evaluation's (``eval/quality.py``) definitions on a small subset. The teacher's reference draw is sampled
    once, from the weights before the first step (the teacher's), and kept in the run folder for a resume."""

    REFERENCE_FILE = "eval/in_training_teacher_reference.safetensors"

    def __init__(self, cfg: Config, loop_config: dict[str, Any], device: torch.device, run_dir: Path | None = None,
                 channels: int = 1, resolution: int = 16) -> None:
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        prompts = loop_config.get("sample_prompts")
        digits = cfg.data.source == "digits" and not cfg.vae.path
        self.kind = None if not (cfg.eval.every and prompts) else "digits" if digits else "teacher" if cfg.model.path else None
        self.enabled = self.kind is not None
        if self.kind == "digits":
            from apexdistill.eval.runner import DigitsBench

            eval_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
                "samples_per_class": cfg.eval.during_samples_per_class, "noise_draws": 1})})
            self.bench = DigitsBench(eval_cfg, torch.tensor(prompts["text"]), torch.tensor(prompts["mask"]))
        elif self.kind == "teacher":
            from apexdistill.eval.quality import image_seed

            k = cfg.eval.during_samples_per_class
            text, mask = torch.tensor(prompts["text"], dtype=torch.float32), torch.tensor(prompts["mask"])
            self.groups = torch.arange(text.shape[0]).repeat_interleave(k)
            self.text, self.mask = text[self.groups], mask[self.groups]
            neg = loop_config.get("negative")
            self.neg = (torch.tensor(neg["text"], dtype=torch.float32), torch.tensor(neg["mask"])) if neg else None

            def noise(draw: int) -> torch.Tensor:
                return torch.stack([torch.randn((channels, resolution, resolution), generator=torch.Generator().manual_seed(
                    image_seed(cfg.eval.seed, draw, int(p), i % k))) for i, p in enumerate(self.groups)])
            self.z, self.z_ref = noise(0), noise(1)
            self.reference: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.cfg.eval.every == 0

    def _model(self, strategy: Strategy) -> torch.nn.Module:
        import copy

        model = strategy.backbone
        if strategy.ema is not None and strategy.name in ("none", "ddp"):
            model = strategy.ema.copy_to(copy.deepcopy(strategy.backbone))
        return model

    @torch.no_grad()
    def _sample(self, model: torch.nn.Module, z: torch.Tensor, teacher: bool) -> torch.Tensor:
        """In batches of ``eval.pipeline_batch_size``: the teacher with its scheduler and CFG, or the student at 1 NFE
        (``eval.quality.sample_row``, the full evaluation's sampling)."""
        from apexdistill.eval.quality import sample_row

        out = []
        step = self.cfg.eval.pipeline_batch_size
        for start in range(0, z.shape[0], step):
            zb = z[start:start + step].to(self.device)
            text, mask = self.text[start:start + step].to(self.device), self.mask[start:start + step].to(self.device)
            g = torch.Generator(device=self.device).manual_seed(self.cfg.eval.seed + start)
            x = sample_row(self.cfg, model, zb, text, mask, self.cfg.eval.teacher_nfe if teacher else 1, teacher, g, self.neg)
            out.append(x.float().cpu())
        return torch.cat(out)

    def prepare(self, strategy: Strategy, resumed: bool, rank: int) -> None:
        """Before the first step: the teacher's reference draw from the initial weights, or, on a resume, the one
        the run kept (no rank scores without it: a sharded forward needs every rank)."""
        if self.kind != "teacher":
            return
        from safetensors.torch import load_file, save_file

        path = self.run_dir / self.REFERENCE_FILE if self.run_dir is not None else None
        have = path is not None and path.is_file()
        if resumed:
            ok = torch.tensor([1 if have else 0], device=self.device)  # NCCL reduces device tensors only
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            if not int(ok):
                self.enabled = False
                _log(rank, f"[train] eval.every: no teacher reference kept in {path}; the in-training scores are off for this resume")
                return
            self.reference = load_file(str(path))["latents"]
            return
        model = strategy.backbone
        was_training = model.training
        rng = torch.get_rng_state()
        self.reference = self._sample(model.eval(), self.z_ref, teacher=True)
        torch.set_rng_state(rng)
        model.train(was_training)
        if rank == 0 and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"latents": self.reference.contiguous()}, str(path))

    @torch.no_grad()
    def __call__(self, strategy: Strategy) -> dict[str, float]:
        model = self._model(strategy)
        was_training = model.training
        rng = torch.get_rng_state()  # scoring must not shift the training noise
        try:
            if self.kind == "digits":
                (row,) = self.bench.score("train", model.eval(), [1], "few_step")
                out = {"eval/fd_1nfe": row.fd}
                if row.accuracy is not None:
                    out["eval/accuracy_1nfe"] = row.accuracy
                return out
            from apexdistill.eval.features import pooled_latents
            from apexdistill.eval.metrics import frechet_distance
            from apexdistill.eval.quality import diversity

            student = pooled_latents(self._sample(model.eval(), self.z, teacher=False)).numpy()
            reference = pooled_latents(self.reference).numpy()
            groups = self.groups.numpy()
            out = {"eval/fd_teacher_1nfe": frechet_distance(student, reference)}
            if self.cfg.eval.during_samples_per_class >= 2:  # diversity needs two images of a prompt
                out["eval/diversity_1nfe"] = diversity(student, groups) / max(diversity(reference, groups), 1e-12)
            return out
        finally:
            torch.set_rng_state(rng)
            model.train(was_training)


@contextlib.contextmanager
def reference_weights(strategy: Strategy, source: str = "auto", frozen: dict[str, torch.Tensor] | None = None) -> Any:
    """The weights guidance targets come from (``objective.apex.guidance_reference``): under LoRA the
    frozen base (adapters disabled); otherwise ``frozen`` (the initial trained parameters, kept at the
    start: the teacher) or the EMA (``auto``). Swapped into the live parameters for the duration and
    restored: the swap writes them in place, so it must happen before the step builds any autograd
    graph (``apex`` computes its guided target first)."""
    from apexdistill.models.lora import has_lora

    backbone = strategy.backbone
    if has_lora(backbone) and source in ("auto", "frozen"):
        backbone.transformer.disable_adapters()
        try:
            yield
        finally:
            backbone.transformer.enable_adapters()
        return
    if source == "frozen":
        if frozen is None:
            raise ValueError("a frozen reference without LoRA needs the kept initial weights (keep_initial_weights)")
        values = frozen
    elif strategy.ema is not None:
        values = strategy.ema.shadow
    else:
        raise ValueError("objective.apex.guidance_ratio > 0 takes its guidance from the frozen base (model.lora.enabled=true or "
                         "objective.apex.guidance_reference=frozen) or the EMA (train.ema_decay > 0): enable one")
    # FSDP2 keeps a module's all-gathered parameters between forwards (the root's until its backward) and registers
    # them in place of the shards: the swap writes the shards, so every module is resharded first (the next forward
    # gathers the swapped values) and again before the restore (no gathered copy of the reference outlives it)
    _reshard(backbone)
    params = dict(backbone.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, value in values.items():
            saved[name] = params[name].detach().clone()
            params[name].detach().copy_(value)
    try:
        yield
    finally:
        _reshard(backbone)
        with torch.no_grad():
            for name, value in saved.items():
                params[name].detach().copy_(value)


def _reshard(module: torch.nn.Module) -> None:
    """Free the all-gathered parameters of every FSDP2 module under ``module`` (nothing for other strategies)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def bind_reference(objective: torch.nn.Module, strategy: Strategy, frozen: dict[str, torch.Tensor] | None,
                   negative: dict[str, list] | None = None) -> None:
    """Give the objective its reference weights (``reference_weights`` on this strategy, with the kept
    initial weights) and the cache's negative embedding, if any (``{"text": ..., "mask": ...}``)."""
    from apexdistill.models.family import get_family

    neg = None
    if negative:
        neg = (torch.tensor(negative["text"], dtype=torch.float32), torch.tensor(negative["mask"], dtype=torch.long))
    objective.set_guidance(neg, lambda source: reference_weights(strategy, source, frozen),
                           guide=get_family(strategy.cfg.model.backbone).guided_velocity)  # the teacher's own CFG rule


def wrap_with_reference(strategy: Strategy, backbone: torch.nn.Module, objective: torch.nn.Module,
                        negative: dict[str, list] | None = None) -> dict[str, torch.Tensor] | None:
    """Wrap the backbone and the objective in the strategy, keep the teacher's weights where a target needs them (a copy
    of the trained parameters as they start, shards under FSDP2; None under LoRA or without such a target) and bind the
    objective's reference weights and negative embedding. Call it before a checkpoint is loaded. Returns the kept
    weights."""
    strategy.wrap(backbone, objective)
    frozen = keep_initial_weights(strategy.cfg, backbone)
    bind_reference(objective, strategy, frozen, negative)
    return frozen


def keep_initial_weights(cfg: Config, backbone: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A copy of the trained parameters as they start (the teacher's), when guidance needs them."""
    from apexdistill.models.lora import has_lora

    if cfg.objective.name != "apex" or not cfg.objective.apex.uses_frozen_reference or has_lora(backbone):
        return None
    return {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}


def train_loop_per_worker(loop_config: dict[str, Any], session: Any = None) -> None:
    """The loop of one worker; ``session`` (``train.session``) is where it runs: a Ray Train worker
    unless told otherwise."""
    cfg = Config.model_validate(loop_config["config"])
    _PROGRESS["file"] = Path(loop_config["progress_file"]) if loop_config.get("progress_file") else None
    _quiet_report_lines()
    session = session or RayTrainSession(loop_config.get("local_rows"))
    rank, world = session.rank, session.world
    run_dir = Path(loop_config["run_dir"])
    device = _device(cfg, session)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (FSDP2 keeps each rank's own shard)

    shapes = DataShapes(**loop_config["shapes"])
    batches = shard_batches(session.dataset_shard("train"), cfg, shapes.rows // world, loop_config["row_bytes"], cfg.run.seed + 1000 * rank,
                            shapes)
    if getattr(batches, "left_out", None):
        left = ", ".join(f"{shapes.buckets[b][0]}x{shapes.buckets[b][1]} ({shapes.bucket_rows[b]} rows)" for b in batches.left_out)
        _log(rank, f"[train] buckets left out (some rank's shard has no row of them): {left}")
    backbone = build_backbone(cfg.model, shapes.channels, shapes.resolution, shapes.text_dim)
    if cfg.model.path:
        _log(rank, f"[train] initialised from {cfg.model.path}")
    objective = build_objective(cfg.objective)
    if cfg.train.batch_size % objective.batch_multiple:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of {objective.batch_multiple} for {objective.name}")
    strategy = build_strategy(cfg, rank, world, device)
    wrap_with_reference(strategy, backbone, objective, loop_config.get("negative"))  # before a checkpoint is loaded
    torch.manual_seed(cfg.run.seed + 1000 * rank)  # then different noise on every rank

    from apexdistill.tracking import RunLogger

    logger = RunLogger.from_handle(loop_config.get("tracking")) if rank == 0 else None
    # steps an earlier fit or worker group already logged are replayed from a checkpoint, not logged twice
    logged_through = logger.last_step() if logger is not None else 0
    sampler = SampleLogger(cfg, loop_config, device, logger, shapes.channels, shapes.resolution)
    scorer = InTrainingEval(cfg, loop_config, device, run_dir, shapes.channels, shapes.resolution)

    step, trained_seconds = 0, 0.0
    storage = RunStorage.from_config(cfg)
    with resume_checkpoint(run_dir, session, storage) as resume:
        if resume is not None:
            folder, where = resume
            state = json.loads((folder / CHECKPOINT_STATE).read_text())
            check_resumable(state, cfg, folder)
            strategy.load(folder)
            batch_rng = load_rank_state(folder, rank)
    if resume is not None:
        strategy.after_load()
        step, trained_seconds = int(state["step"]), float(state.get("trained_seconds", 0.0))
        batches.resume_at(step, batch_rng)
        restarted = restart_line(run_dir, step, where) if rank == 0 else None
        _log(rank, restarted or f"[train] resumed at step {step} from {where}")
    scorer.prepare(strategy, resumed=resume is not None, rank=rank)

    n_train = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    accum = cfg.train.grad_accum_steps
    _log(rank, f"[train] {cfg.objective.name} on {cfg.model.backbone}/{cfg.model.preset} ({cfg.train.strategy}, {device.type}): "
         f"{n_train / 1e6:.2f}M trainable params, {shapes.rows} cached rows, batch {cfg.train.batch_size} x {accum} accum x "
         f"{world} worker(s), {cfg.train.steps} steps")

    def trainer_state() -> dict[str, Any]:
        return {"step": step, "trained_seconds": trained_seconds + time.time() - started, "objective": cfg.objective.name,
                "strategy": cfg.train.strategy, "world_size": world, "identity": run_identity(cfg),
                "conditioning": loop_config.get("conditioning")}

    def checkpoint(final: bool) -> Any:
        state = trainer_state()
        write = lambda tmp: write_checkpoint(tmp, strategy, batches, state, final)  # noqa: E731
        if storage is not None:  # published on object storage; Ray keeps a pointer to it
            uri = publish_remote(storage, step, write, keep=cfg.train.num_to_keep, rank=rank)
            return session.checkpoint(write_pointer(run_dir, uri, step)) if rank == 0 else None
        folder = publish_checkpoint(run_dir, step, write, keep=cfg.train.num_to_keep, rank=rank)
        return session.checkpoint(folder) if rank == 0 else None

    started, window_start, window_steps = time.time(), time.time(), 0
    metrics: dict[str, float] = {}
    backbone.train()
    while step < cfg.train.steps:
        strategy.set_lr(lr_factor(cfg, step))
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in batches.next(cfg.train.batch_size).items()}
            with strategy.autocast():
                loss, micro_metrics = objective.loss(strategy.model, batch, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step} on rank {rank}: {micro_metrics}")
            strategy.backward(loss, sync=micro == accum - 1)
            for k, v in micro_metrics.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        metrics = dict(sums)
        metrics["grad_norm"] = strategy.step()
        step += 1
        window_steps += 1
        _maybe_fail(cfg, step, rank, world, run_dir)

        last = step >= cfg.train.steps or _should_stop(cfg, started, trained_seconds)
        periodic = bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0 and not last
        scored = scorer.due(step) and not last
        logged = step % cfg.train.log_every == 0 or last or scored
        if scored:
            metrics.update(scorer(strategy))
        if logged:
            elapsed = time.time() - window_start
            metrics.update(step=step, lr=strategy.lr, step_time_s=elapsed / max(window_steps, 1),
                           samples_per_s=window_steps * cfg.train.batch_size * accum * world / max(elapsed, 1e-9),
                           peak_memory_mb=peak_memory_mb(device))
            eta = (cfg.train.steps - step) * metrics["step_time_s"]
            if cfg.train.max_minutes is not None:  # the time budget may end the run first
                eta = min(eta, 60 * cfg.train.max_minutes - (trained_seconds + time.time() - started))
            terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
            _log(rank, f"[train] step {step}/{cfg.train.steps} loss={metrics['loss']:.4f} {terms} "
                 f"| {metrics['samples_per_s']:.0f} samples/s | ETA {_fmt_eta(eta)}")
            if logger is not None and step > logged_through:
                logger.log_metrics(metrics, step)
            window_start, window_steps = time.time(), 0
        if cfg.tracking.sample_every and step % cfg.tracking.sample_every == 0 and not last:
            sampler(strategy.backbone, step)
        if periodic:  # every rank reports, rank 0 attaches the checkpoint
            session.report({**metrics, "step": step}, checkpoint=checkpoint(final=False))
        elif (scored or logged and loop_config.get("report_progress")) and not last:
            # Ray Train's controller takes one report per poll (every 2 s) and the worker waits for it: a plain run
            # reports its checkpoints and scores only (rank 0 logs every step to MLflow itself); a sweep trial
            # reports every logged step too, since its metric may be any of them
            session.report({**metrics, "step": step})
        if last:
            break
        if stop_requested():  # a Ctrl-C reached an in-process run: stop here, between steps, not inside a write
            raise KeyboardInterrupt

    batches.close()
    sampler(strategy.backbone, step)
    final_ckpt = checkpoint(final=True)
    trained_seconds += time.time() - started
    session.report({**metrics, "step": step, "trained_seconds": trained_seconds}, checkpoint=final_ckpt)
    _log(rank, f"[train] done: {step} steps in {_fmt_eta(trained_seconds)}")
