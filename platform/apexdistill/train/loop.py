"""The training recipe: one Ray Train worker function that owns the loop top to bottom.

``train_loop_per_worker({"config": <resolved config dict>})`` builds the data, the backbone, the
objective, the optimizer and the EMA, resumes from ``ray.train.get_checkpoint()`` when there is one,
trains, and reports metrics and checkpoints with ``ray.train.report``. ``TorchTrainer`` runs it in
local mode (``num_workers=0``, in the driver process) or on N workers; the loop is the same.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from apexdistill.config import Config
from apexdistill.method.base import build_objective
from apexdistill.method.ema import EMA
from apexdistill.models.backbone import Backbone
from apexdistill.models.build import build_backbone
from apexdistill.train.data import DataShapes, shard_batches

CHECKPOINT_STATE = "trainer_state.json"


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def build_optimizer(cfg: Config, backbone: torch.nn.Module, objective: torch.nn.Module) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [
        {"params": [p for p in backbone.parameters() if p.requires_grad], "lr": cfg.train.lr, "name": "backbone"}
    ]
    for group in objective.param_groups():
        groups.append({"params": group["params"], "lr": cfg.train.lr * group.get("lr_mult", 1.0), "name": group["name"]})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)


def lr_factor(cfg: Config, step: int) -> float:
    """Linear warm-up, then constant or cosine to zero at ``train.steps``."""
    warm = cfg.train.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.train.schedule == "cosine":
        progress = (step - warm) / max(1, cfg.train.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def save_checkpoint(folder: Path, backbone: Backbone, ema: EMA | None, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()}, str(folder / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, str(folder / "ema.safetensors"))
    obj_state = {k: v.detach().contiguous() for k, v in objective.state_dict().items()}
    if obj_state:
        save_file(obj_state, str(folder / "objective.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    save_file({"torch": torch.get_rng_state(), **({"batches": rng} if (rng := state.pop("batch_rng", None)) is not None else {})},
              str(folder / "rng.safetensors"))
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2))


def run_identity(cfg: Config) -> dict[str, Any]:
    """What must not change between a run and its resumption (the schedule and budget may)."""
    return {"objective": cfg.objective.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
            "data": {"source": cfg.data.source, "path": cfg.data.path, "resolution": cfg.data.resolution},
            "text_encoder": cfg.text_encoder.model_dump(mode="json"), "vae": cfg.vae.model_dump(mode="json")}


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


def load_checkpoint(folder: Path, backbone: Backbone, ema: EMA | None, objective: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    backbone.load_state_dict(load_file(str(folder / "model.safetensors")))
    if ema is not None and (folder / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
    if (folder / "objective.safetensors").is_file():
        objective.load_state_dict(load_file(str(folder / "objective.safetensors")), strict=False)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / CHECKPOINT_STATE).read_text())
    if (folder / "rng.safetensors").is_file():
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if "batches" in rng:
            state["batch_rng"] = rng["batches"]
    return state


def apply_hyperparameters(cfg: Config, optimizer: torch.optim.Optimizer, objective: torch.nn.Module) -> None:
    """The config's lr/betas/weight decay win over the ones stored in a resumed optimizer state."""
    mults = {g["name"]: g.get("lr_mult", 1.0) for g in objective.param_groups()}
    for group in optimizer.param_groups:
        group["base_lr"] = cfg.train.lr * mults.get(group.get("name"), 1.0)
        group["betas"] = tuple(cfg.train.betas)
        group["weight_decay"] = cfg.train.weight_decay


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def publish_checkpoint(run_dir: Path, step: int, write: Any, keep: int = 2) -> Path:
    """Write into a hidden temp folder, then rename: a crash never leaves a complete-looking checkpoint."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in checkpoint_root(run_dir).glob("step_*") if (p / CHECKPOINT_STATE).is_file())
    return done[-1] if done else None


def find_resume_checkpoint(run_dir: Path) -> ray.train.Checkpoint | None:
    """Ray's checkpoint on a restarted run; in local mode (no Ray storage) the run folder's latest."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        return ckpt
    local = latest_checkpoint(run_dir)
    return ray.train.Checkpoint.from_directory(str(local)) if local is not None else None


def _state(cfg: Config, step: int, trained_seconds: float, batches: Any) -> dict[str, Any]:
    state = {"step": step, "trained_seconds": trained_seconds, "objective": cfg.objective.name, "identity": run_identity(cfg)}
    generator = getattr(batches, "generator", None)
    if generator is not None:
        state["batch_rng"] = generator.get_state()
    return state


def _should_stop(cfg: Config, started: float, trained_seconds: float) -> bool:
    """The time budget is decided on rank 0 and shared, so every rank stops at the same step."""
    if cfg.train.max_minutes is None:
        return False
    stop = torch.tensor([float(trained_seconds + time.time() - started > 60 * cfg.train.max_minutes)])
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(stop, src=0)
    return bool(stop.item())


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + 1000 * rank)

    shapes = DataShapes(**loop_config["shapes"])
    batches = shard_batches(ray.train.get_dataset_shard("train"), cfg, shapes.rows // world, loop_config["row_bytes"], cfg.run.seed + 1000 * rank)
    backbone = build_backbone(cfg.model, shapes.channels, shapes.resolution, shapes.text_dim)
    if cfg.model.path:
        _log(rank, f"[train] initialised from {cfg.model.path}")
    objective = build_objective(cfg.objective)
    if cfg.train.batch_size % objective.batch_multiple:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of {objective.batch_multiple} for {objective.name}")
    model: torch.nn.Module = backbone
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(backbone)
    optimizer = build_optimizer(cfg, backbone, objective)
    ema = EMA(backbone, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

    step, trained_seconds = 0, 0.0
    resume = find_resume_checkpoint(Path(loop_config["run_dir"]))
    if resume is not None:
        with resume.as_directory() as folder:
            check_resumable(json.loads((Path(folder) / CHECKPOINT_STATE).read_text()), cfg, Path(folder))
            state = load_checkpoint(Path(folder), backbone, ema, objective, optimizer)
            had_ema = (Path(folder) / "ema.safetensors").is_file()
        apply_hyperparameters(cfg, optimizer, objective)
        if ema is not None and not had_ema:
            ema = EMA(backbone, cfg.train.ema_decay)  # the run had no EMA: start it from the loaded weights
        step, trained_seconds = int(state["step"]), float(state.get("trained_seconds", 0.0))
        batches.resume_at(step, state.get("batch_rng"))
        _log(rank, f"[train] resumed at step {step}")

    n_train = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    _log(rank, f"[train] {cfg.objective.name} on {cfg.model.backbone}/{cfg.model.preset}: {n_train / 1e6:.2f}M trainable params, "
         f"{shapes.rows} cached rows, batch {cfg.train.batch_size} x {world} worker(s), {cfg.train.steps} steps")

    started, window_start, window_steps = time.time(), time.time(), 0
    metrics: dict[str, float] = {}
    backbone.train()
    while step < cfg.train.steps:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(cfg, step)
        batch = batches.next(cfg.train.batch_size)
        loss, metrics = objective.loss(model, batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {metrics}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        if ema is not None:
            ema.update(backbone)
        step += 1
        window_steps += 1

        last = step >= cfg.train.steps or _should_stop(cfg, started, trained_seconds)
        periodic = bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0 and not last
        if periodic:  # every rank reports, rank 0 attaches the checkpoint
            checkpoint = None
            if rank == 0:
                elapsed_total = trained_seconds + time.time() - started
                folder = publish_checkpoint(Path(loop_config["run_dir"]), step, lambda tmp: save_checkpoint(
                    tmp, backbone, ema, objective, optimizer, _state(cfg, step, elapsed_total, batches)))
                checkpoint = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)
        if step % cfg.train.log_every == 0 or last:
            elapsed = time.time() - window_start
            metrics.update(step=step, lr=optimizer.param_groups[0]["lr"],
                           samples_per_s=window_steps * cfg.train.batch_size * world / max(elapsed, 1e-9),
                           step_time_s=elapsed / max(window_steps, 1))
            eta = (cfg.train.steps - step) * metrics["step_time_s"]
            terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
            _log(rank, f"[train] step {step}/{cfg.train.steps} loss={metrics['loss']:.4f} {terms} "
                 f"| {metrics['samples_per_s']:.0f} samples/s | ETA {_fmt_eta(eta)}")
            if not last and not periodic:
                ray.train.report(dict(metrics))
            window_start, window_steps = time.time(), 0
        if last:
            break

    batches.close()
    trained_seconds += time.time() - started
    checkpoint = None
    if rank == 0:
        state = _state(cfg, step, trained_seconds, batches)
        folder = publish_checkpoint(Path(loop_config["run_dir"]), step, lambda tmp: save_checkpoint(tmp, backbone, ema, objective, optimizer, state))
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report({**metrics, "step": step, "trained_seconds": trained_seconds}, checkpoint=checkpoint)
    _log(rank, f"[train] done: {step} steps in {_fmt_eta(trained_seconds)}")

