"""Parallelism strategies behind one small interface, chosen by ``train.strategy``.

Every strategy owns the same four jobs for the worker loop:

- ``wrap(backbone, objective)``: shard or replicate the model, build the optimizer and the EMA;
  afterwards ``strategy.model`` is what the objective calls (``model(x, t, text, mask)``);
- ``backward(loss, sync)`` and ``step()``: one micro-batch's gradients, then one optimizer step
  (gradient sync, clipping, EMA) returning the gradient norm;
- ``save(folder)`` / ``load(folder)``: the training state, called on every rank with one shared folder;
- ``full_weights(ema)``: the whole model's weights on rank 0 (collective), for export and evaluation.

``none`` is one process; ``ddp`` replicates with ``DistributedDataParallel``; ``fsdp2`` applies
``fully_shard`` to each transformer block (``backbone.blocks()``) and then the root and saves
sharded checkpoints with ``torch.distributed.checkpoint``; ``deepspeed`` runs ZeRO stage 1/2/3 from ``train.deepspeed``.
``train.gradient_checkpointing`` is switched on on the plain backbone before any wrapping.
Objective parameters (a learnable condition shift) sit outside the backbone; ``ddp`` and ``fsdp2``
average their gradients explicitly, ``deepspeed`` owns them through a container module.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from apexdistill.config import Config
from apexdistill.method.ema import EMA

MODEL_FILE = "model.safetensors"  # full weights (export, evaluation)
EMA_FILE = "ema.safetensors"  # full weights with the EMA values
EMA_SHADOW_FILE = "ema_shadow.safetensors"  # deepspeed: the EMA of the trained parameters only
OBJECTIVE_FILE = "objective.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint folder (fsdp2)
DEEPSPEED_DIR = "deepspeed"
STRATEGY_NAMES = ("none", "ddp", "fsdp2", "deepspeed")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if distributed():
        dist.barrier()


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def build_optimizer(cfg: Config, backbone: nn.Module, objective: nn.Module) -> torch.optim.Optimizer:
    """AdamW with one group for the backbone's trainable weights (all of them, or the LoRA adapters)
    and one per objective group (the learnable shift, with its lr multiplier)."""
    groups: list[dict[str, Any]] = [
        {"params": [p for p in backbone.parameters() if p.requires_grad], "lr": cfg.train.lr, "name": "backbone"}
    ]
    for group in objective.param_groups():
        groups.append({"params": group["params"], "lr": cfg.train.lr * group.get("lr_mult", 1.0), "name": group["name"]})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)


def apply_hyperparameters(cfg: Config, optimizer: torch.optim.Optimizer, objective: nn.Module) -> None:
    """The config's lr/betas/weight decay win over the ones stored in a resumed optimizer state."""
    mults = {g["name"]: g.get("lr_mult", 1.0) for g in objective.param_groups()}
    for group in optimizer.param_groups:
        group["base_lr"] = cfg.train.lr * mults.get(group.get("name"), 1.0)
        group["betas"] = tuple(cfg.train.betas)
        group["weight_decay"] = cfg.train.weight_decay


def prepare_backbone(cfg: Config, backbone: nn.Module) -> None:
    """What every strategy does to the plain backbone before it wraps it (so before ``fully_shard``,
    DDP or DeepSpeed): activation checkpointing of its blocks with ``train.gradient_checkpointing``."""
    if cfg.train.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()


class Strategy:
    name = "none"

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.backbone: nn.Module
        self.objective: nn.Module
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.ema: EMA | None = None

    # ------------------------------------------------------------------ setup
    def wrap(self, backbone: nn.Module, objective: nn.Module) -> None:
        objective.attach(backbone)
        prepare_backbone(self.cfg, backbone)
        self.backbone, self.objective = backbone.to(self.device), objective.to(self.device)
        self.model = self._wrap_model(self.backbone)
        self.optimizer = build_optimizer(self.cfg, self.backbone, self.objective)
        self.ema = EMA(self.backbone, self.cfg.train.ema_decay) if self.cfg.train.ema_decay > 0 else None

    def _wrap_model(self, backbone: nn.Module) -> nn.Module:
        return backbone

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.use_bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one step
    def set_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, sync: bool = True) -> None:
        with self.no_sync(sync):
            (loss / self.cfg.train.grad_accum_steps).backward()

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _sync_objective_grads(self) -> None:
        """Average the gradients of the objective's own parameters (outside the wrapped backbone)."""
        if not distributed():
            return
        for group in self.objective.param_groups():
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(self.world)

    def _clip(self) -> float:
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self._trainable(), max_norm))

    def step(self) -> float:
        self._sync_objective_grads()
        norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.backbone)
        return norm

    # ------------------------------------------------------------------ state
    def full_weights(self, ema: bool = False) -> dict[str, Tensor] | None:
        """Collective: every rank calls it; rank 0 gets the whole model's weights, others None."""
        if self.rank != 0:
            return None
        if ema and self.ema is not None:
            return _contiguous(self.ema.full_state(self.backbone))
        return _contiguous(self.backbone.state_dict())

    def save_weights(self, folder: Path) -> None:
        """Full weights for export and evaluation (``model.safetensors``, ``ema.safetensors``)."""
        model = self.full_weights(ema=False)
        ema = self.full_weights(ema=True) if self.ema is not None else None
        if self.rank == 0:
            save_file(model, str(folder / MODEL_FILE))
            if ema is not None:
                save_file(ema, str(folder / EMA_FILE))

    def save(self, folder: Path, final: bool = False) -> None:
        """Replicated state: rank 0 writes everything (the other ranks hold the same values)."""
        self.save_weights(folder)
        if self.rank == 0:
            obj = _contiguous(self.objective.state_dict())
            if obj:
                save_file(obj, str(folder / OBJECTIVE_FILE))
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        self.backbone.load_state_dict(load_file(str(folder / MODEL_FILE), device=str(self.device)))
        self._load_objective(folder)
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location=self.device))
        self._load_ema_file(folder)

    def _load_objective(self, folder: Path) -> None:
        if (folder / OBJECTIVE_FILE).is_file():
            self.objective.load_state_dict(load_file(str(folder / OBJECTIVE_FILE), device=str(self.device)), strict=False)

    def _load_ema_file(self, folder: Path) -> None:
        if self.ema is None:
            return
        if (folder / EMA_FILE).is_file():
            full = load_file(str(folder / EMA_FILE), device=str(self.device))
            self.ema.load_state_dict({k: full[k] for k in self.ema.shadow if k in full})
        else:  # the run had no EMA before: start it from the loaded weights
            self.ema = EMA(self.backbone, self.cfg.train.ema_decay)

    def after_load(self) -> None:
        apply_hyperparameters(self.cfg, self.optimizer, self.objective)


class DDPStrategy(Strategy):
    name = "ddp"

    def _wrap_model(self, backbone: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        import warnings

        # 1x1 convolutions' gradients have equivalent but different strides: harmless, and noisy
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # the objectives call the model several times per step (generator, fake branch, anchor);
        # one backward then reduces every parameter once, which plain DDP handles
        return DistributedDataParallel(backbone, device_ids=device_ids, gradient_as_bucket_view=True)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.model.no_sync()


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ValueError(f"train.strategy='fsdp2': {type(backbone).__name__} has no transformer blocks to shard")
    return blocks()


def shard_backbone(backbone: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: ``fully_shard`` on each transformer block, then on the backbone. With ``param_dtype`` (bf16 on GPUs)
    the blocks compute in it and cast their inputs to it; the backbone's own inputs are cast by ``_cast_inputs``
    instead of FSDP's input cast, which would also round the time (0.999 -> 1.0, 0.6 -> 0.6016 in bf16): the
    latents and text states go to ``param_dtype``, the time and every other conditioning scalar stay float32, as
    the stock pipelines pass them, and the transformer's time embedding computes its sinusoids from them in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if param_dtype is None:
        for block in transformer_blocks(backbone):
            fully_shard(block)
        return fully_shard(backbone)
    for block in transformer_blocks(backbone):
        fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    fully_shard(backbone, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                         cast_forward_inputs=False))
    backbone.register_forward_pre_hook(_cast_inputs(param_dtype), with_kwargs=True)
    return backbone


def _cast_inputs(dtype: torch.dtype) -> Any:
    """``Backbone.forward(x, t, text, text_mask, target_t)``: x and text to ``dtype``; t, the mask and target_t as given."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = list(args)
        for i, name in ((0, "x"), (2, "text")):
            if i < len(args) and torch.is_tensor(args[i]) and args[i].is_floating_point():
                args[i] = args[i].to(dtype)
            elif torch.is_tensor(kwargs.get(name)) and kwargs[name].is_floating_point():
                kwargs[name] = kwargs[name].to(dtype)
        return tuple(args), kwargs
    return hook


class TrainModule(nn.Module):
    """Backbone and objective under one root, so state-dict helpers see every trained parameter."""

    def __init__(self, backbone: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.backbone, self.objective = backbone, objective


class FSDP2Strategy(Strategy):
    name = "fsdp2"

    def _wrap_model(self, backbone: nn.Module) -> nn.Module:
        shard_backbone(backbone, torch.bfloat16 if self.cfg.train.use_bf16 and self.device.type == "cuda" else None)
        self.root = TrainModule(backbone, self.objective)
        return backbone

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters itself

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        self.backbone.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _clip(self) -> float:
        """Sharded (DTensor) and plain gradients are normed separately and combined."""
        from torch.distributed.tensor import DTensor

        grads = self._trainable()
        sharded = [p for p in grads if isinstance(p, DTensor)]
        plain = [p for p in grads if not isinstance(p, DTensor)]
        total = torch.zeros((), device=self.device)
        for params in (sharded, plain):
            if params:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
                total = total + norm.to(total.device).float() ** 2
        total = total.sqrt()
        if self.cfg.train.grad_clip > 0:
            for params in (sharded, plain):
                if params:
                    torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.grad_clip, total)
        return float(total)

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state: dict[str, Any] = {
            "model": get_model_state_dict(self.root),
            "optim": get_optimizer_state_dict(self.root, self.optimizer),
        }
        if self.ema is not None:
            state["ema"] = self.ema.shadow
        return state

    def full_weights(self, ema: bool = False) -> dict[str, Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        if ema and self.ema is not None:  # gather every shadow shard (collective), then fill in the rest
            shadows = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in self.ema.shadow.items()}
        full = get_model_state_dict(self.backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        if ema and self.ema is not None:
            full.update({k: v for k, v in shadows.items() if k in full})
        return _contiguous(full)

    def save(self, folder: Path, final: bool = False) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(folder / SHARDED_DIR))
        if final:  # full weights for export; periodic checkpoints stay sharded only
            self.save_weights(folder)

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
        set_model_state_dict(self.root, state["model"])
        set_optimizer_state_dict(self.root, self.optimizer, state["optim"])


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def wrap(self, backbone: nn.Module, objective: nn.Module) -> None:
        import deepspeed

        objective.attach(backbone)
        prepare_backbone(self.cfg, backbone)
        self.backbone, self.objective = backbone.to(self.device), objective.to(self.device)
        t = self.cfg.train
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum_steps,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": t.deepspeed.stage},
            "zero_allow_untested_optimizer": True,  # our AdamW with its named groups
            "bf16": {"enabled": bool(t.use_bf16 and self.device.type == "cuda")},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if t.deepspeed.offload_optimizer:
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        root = TrainModule(self.backbone, self.objective)
        optimizer = build_optimizer(self.cfg, self.backbone, self.objective)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=root, optimizer=optimizer, config=ds_config)
        # the objective calls the backbone itself: ZeRO's hooks live on the modules, not on the engine
        self.model = self.backbone
        self.ema = EMA(self.backbone, t.ema_decay) if t.ema_decay > 0 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, sync: bool = True) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        self.engine.step()  # an optimizer step only at the accumulation boundary

    def step(self) -> float:
        if self.ema is not None:
            self.ema.update(self.backbone)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_weights(self, ema: bool = False) -> dict[str, Tensor] | None:
        if self.cfg.train.deepspeed.stage < 3:
            return super().full_weights(ema)
        import deepspeed

        params = list(self.backbone.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = _contiguous(self.backbone.state_dict()) if self.rank == 0 else None
        return full

    def save(self, folder: Path, final: bool = False) -> None:
        self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag="state")
        if self.rank == 0 and self.ema is not None:
            save_file(_contiguous(self.ema.state_dict()), str(folder / EMA_SHADOW_FILE))
        if final:
            self.save_weights(folder)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag="state", load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder / DEEPSPEED_DIR}: no DeepSpeed checkpoint with tag 'state'")
        shadow = folder / EMA_SHADOW_FILE
        if self.ema is not None and shadow.is_file():
            self.ema.load_state_dict(load_file(str(shadow), device=str(self.device)))


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Strategy, DDPStrategy, FSDP2Strategy, DeepSpeedStrategy)}


def build_strategy(cfg: Config, rank: int, world: int, device: torch.device) -> Strategy:
    if cfg.train.strategy != "none" and not distributed():
        raise RuntimeError(f"train.strategy='{cfg.train.strategy}' needs a process group (run it on Ray Train workers)")
    return STRATEGIES[cfg.train.strategy](cfg, rank, world, device)
