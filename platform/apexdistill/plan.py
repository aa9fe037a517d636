"""`apexdistill plan`: the per-GPU memory of a training config, before any GPU is spent.

Parameter counts are exact: the model is built on the meta device (``build_meta_backbone``: every
parameter has its shape and no storage; nothing is downloaded or allocated), LoRA adapters included.
Memory is in GiB (2**30 bytes) per GPU, with P parameters, T of them trained, N workers, c bytes per
compute element (2 in bf16, 4 in fp32):

=============  ===================================================================================
weights        none/ddp 4P (+2T: autocast's bf16 copies of the trained weights); fsdp2 4P/N plus the
               unsharded compute copies of the root and two blocks (the one running, the prefetched
               one); deepspeed cP (stage 3: cP/N plus two gathered blocks)
gradients      none/ddp 4T; fsdp2 4T/N plus one block's unsharded gradients before their
               reduce-scatter; deepspeed stage 1 cT, stage 2/3 4T/N plus a reduce bucket (5e8 elements)
optimizer      AdamW's two fp32 moments 8T (sharded /N by fsdp2 and deepspeed; deepspeed also keeps
               an fp32 master copy 4T/N; none of it with ``offload_optimizer``); on CUDA the foreach
               step adds one temporary of a moment's size
ema            the EMA shadow of the trained parameters: 4T (fsdp2 /N; deepspeed cT)
teacher copy   apex with a target from the frozen teacher (the demo's recipe: its consistency target) on a
               full fine-tune keeps the trained parameters as they start: 4T (fsdp2 /N; deepspeed cT);
               none under LoRA (the base with adapters disabled is the teacher)
activations    what autograd keeps for backward, *traced* (not guessed): one sample of the configured
               size runs through the meta model under ``saved_tensors_hooks`` and every saved
               storage is counted once (weights excluded), per block (``backbone.blocks()``) and
               outside the blocks.
               Attention is counted as flash/memory-efficient SDPA keeps it (q, k, v, output and
               the log-sum-exp; no L x L matrix). Per step: batch x sum(objective.gradient_passes())
               samples (apex: a generator pass of B and a batched fake-branch + anchor pass of 2B;
               fm: B). With ``train.gradient_checkpointing`` each block keeps only its inputs, and
               backward recomputes one block at a time for the largest pass.
=============  ===================================================================================

The consistency bank (apex, ``objective.apex.consistency_bank_size`` N > 0 with the consistency target on) is host
memory, per worker, planned apart against ``train.host_memory_gb``: N one-step rows and round(N x
consistency_renoise_fraction) re-noised ones (with consistency_renoise_t > 0), each three fp32 latents (noise or
re-noised point, data step, the teacher's displacement), and the text states of at most N distinct prompts (fp32, with
an int64 mask). Each shape bucket fills a bank of its own. ``tests/test_plan.py`` checks it against a filled bank's bytes.

Peak = weights + optimizer + ema + teacher copy + max(gradients, activations): backward frees each block's
activations as it makes that block's gradients (with ``train.grad_accum_steps > 1`` the gradients
live through the next micro-batch's forward, so both are added). A plan fits when the peak is at
most 90% of ``train.gpu_memory_gb`` (the rest: CUDA context, NCCL buffers, allocator fragmentation).
``tests/test_plan.py`` checks the whole estimate against the peak measured over real training steps
on CPU (``measure_peak_bytes``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from apexdistill.config import Config, ConfigError, build_config

GIB = 2**30
#: share of train.gpu_memory_gb a plan may use; the rest is the CUDA context, NCCL, fragmentation
USABLE_FRACTION = 0.9
#: DeepSpeed's default reduce_bucket_size (elements): the gradient buckets of ZeRO-2/3
DEEPSPEED_BUCKET = 5e8


# ----------------------------------------------------------------------------- what autograd keeps


@dataclass
class ActivationTrace:
    """Bytes autograd saves for one sample through the backbone (one call with gradient)."""

    blocks: list[int]
    #: bytes of the tensors that enter each block and are not saved elsewhere (what a checkpointed
    #: block keeps alive)
    block_inputs: list[int]
    outside: int

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.outside

    def kept(self, checkpointing: bool) -> int:
        return self.outside + sum(self.block_inputs) if checkpointing else self.total


class _FlashAttention(torch.autograd.Function):
    """SDPA as fused kernels keep it for backward: q, k, v, the output, the log-sum-exp (and a mask
    when there is one). Forward computes the real output (shape-only on meta)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if isinstance(mask, torch.Tensor) else []))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: plans trace forward only
        raise RuntimeError("the plan's attention stand-in has no backward")


class _AttentionAsFlash(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention and torch.is_grad_enabled():
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args))
            named.update(kwargs)
            q, k, v = named.pop("query"), named.pop("key"), named.pop("value")
            # inside this handler the mode is off: the stand-in's forward calls the real op
            return _FlashAttention.apply(q, k, v, named.pop("attn_mask", None), named)
        return func(*args, **kwargs)


def trace_activations(backbone: nn.Module, latent: tuple[int, int, int], text_len: int, text_dim: int,
                      dtype: torch.dtype) -> ActivationTrace:
    """Run one sample (``latent`` = (C, H, W), ``text_len`` x ``text_dim`` text states, no padding)
    through a meta-device backbone in ``dtype`` and count the bytes autograd saves, per block."""
    model = backbone.to(dtype)
    blocks = model.blocks()
    per_block = [0] * len(blocks)
    inputs = [0] * len(blocks)
    # weights saved for backward (a linear keeps its weight for the input's gradient) are counted
    # under weights, not again here
    seen: set[int] = {p.untyped_storage()._cdata for p in [*model.parameters(), *model.buffers()]}
    current: list[int | None] = [None]
    outside = [0]

    def add(t: torch.Tensor, bucket: list[int], index: int) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # one count per storage: views and re-saved tensors are free
        if key in seen:
            return
        seen.add(key)
        bucket[index] += storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        i = current[0]
        if i is None:
            add(t, outside, 0)
        else:
            add(t, per_block, i)
        return t

    def tensors(obj: Any):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                yield from tensors(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                yield from tensors(o)

    handles = []
    for i, block in enumerate(blocks):
        def pre(module, args, kwargs, i=i):
            for t in tensors((args, kwargs)):
                add(t, inputs, i)  # a checkpointed block keeps these (counted once over all blocks)
            current[0] = i

        def post(module, args, kwargs, out):
            current[0] = None

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    c, h, w = latent
    x = torch.empty((1, c, h, w), device="meta", dtype=dtype)
    t = torch.full((1,), 0.5, device="meta", dtype=dtype)
    text = torch.empty((1, text_len, text_dim), device="meta", dtype=dtype)
    try:
        with torch.enable_grad(), _AttentionAsFlash(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t, text, None)
    finally:
        for handle in handles:
            handle.remove()
    return ActivationTrace(blocks=per_block, block_inputs=inputs, outside=outside[0])


# ----------------------------------------------------------------------------- shapes of a config


@dataclass
class Shapes:
    latent: tuple[int, int, int]
    text_len: int
    text_dim: int
    notes: list[str] = field(default_factory=list)


def config_shapes(cfg: Config) -> Shapes:
    """The sample a config trains on, from config files only: (C, H, W) as the transformer sees it
    (latents through ``vae.path``, the published preset's own VAE, or pixels), the text length and width."""
    from apexdistill.models.family import get_family
    from apexdistill.models.vae import read_vae_config

    family = get_family(cfg.model.backbone)
    res = cfg.data.resolution
    notes: list[str] = []
    published = not cfg.model.path and cfg.model.preset in family.published_presets
    if cfg.model.path:
        from apexdistill.assets import resolve_model_path
        from apexdistill.models.build import resolve_transformer_folder

        folder = resolve_transformer_folder(resolve_model_path(cfg.model.path))
        t_conf = json.loads((folder / "config.json").read_text())
    else:
        t_conf = family.preset_config(cfg.model.preset, cfg.data.image_channels, res, _encoder_width(cfg), cfg.model.target_time)
    text_dim = family.text_dim(t_conf)
    if cfg.vae.path:
        _, v_conf, v_cls = read_vae_config(cfg.vae.path)
        channels, down = v_cls.config_channels(v_conf), v_cls.config_downsample(v_conf)
    elif published:
        channels, down = family.in_channels(t_conf), family.vae_downsample
        notes.append(f"latents of {cfg.model.preset}'s own VAE: {down} px per latent cell, {channels} channels")
    else:
        channels, down = cfg.data.image_channels, 1
    step = down * family.patch_size(t_conf)
    if res % step:
        raise ConfigError(f"data.resolution={res} is not a multiple of {step} (the VAE's {down} px per latent cell x "
                          f"the transformer's patch {family.patch_size(t_conf)}) for {cfg.model.path or cfg.model.preset}")
    text_len = int(cfg.text_encoder.max_length or 16)
    if published and cfg.text_encoder.kind != "pipeline":
        text_len = int(family.prompt_defaults().max_sequence_length)
        notes.append(f"text: {text_len} tokens of width {text_dim} ({family.pipeline_class}'s own encoder and default length)")
    return Shapes(latent=(channels, res // down, res // down), text_len=text_len, text_dim=text_dim, notes=notes)


PUBLISHED_MICRO_BATCH, PUBLISHED_GLOBAL_BATCH = 4, 64  # APEX's reference configs (APEX_METHOD.md, "Headline numbers")


#: what a run of a published architecture is, where the config leaves these at the built-in digits' defaults
def published_assumptions(cfg: Config, explicit: set[str]) -> dict[str, Any]:
    """For ``model.preset`` = a published architecture (no model.path): its native resolution, bf16 on GPUs, FSDP2 on
    one 8-GPU node and the paper's micro batch at its global batch, for each of those keys the config does not set
    itself (``explicit``: the dotted keys it sets)."""
    from apexdistill.models.family import get_family

    family = get_family(cfg.model.backbone)
    if cfg.model.path or cfg.model.preset not in family.published_presets:
        return {}
    want = {"data.resolution": family.published_resolution, "train.use_gpu": True, "train.precision": "bf16",
            "train.strategy": "fsdp2", "train.num_workers": 8}
    if {"train.strategy", "train.num_workers"} & explicit:  # a parallel setup of the user's own: keep it whole
        want = {k: v for k, v in want.items() if k not in ("train.strategy", "train.num_workers")}
    if not {"train.batch_size", "train.grad_accum_steps"} & explicit:
        # the paper's reference recipe: micro batch 4, global batch 64 (the digits' 128 a rank is not a 1024 px batch)
        workers = want.get("train.num_workers", cfg.train.num_workers) or 1
        want.update({"train.batch_size": PUBLISHED_MICRO_BATCH,
                     "train.grad_accum_steps": max(1, PUBLISHED_GLOBAL_BATCH // (PUBLISHED_MICRO_BATCH * workers))})
    return {k: v for k, v in want.items() if k not in explicit}


def _encoder_width(cfg: Config) -> int:
    """Width of the configured (non-pipeline) text encoder, from its config.json."""
    from apexdistill.models.text import minilm_path

    folder = cfg.text_encoder.path if cfg.text_encoder.kind == "transformers" else minilm_path()
    conf = json.loads((Path(folder) / "config.json").read_text())
    return int(conf.get("hidden_size") or (conf.get("text_config") or {}).get("hidden_size"))


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    family: str
    model: str
    strategy: str
    workers: int
    precision: str
    device: str
    lora_rank: int | None
    batch_size: int
    grad_accum_steps: int
    resolution: int
    latent: tuple[int, int, int]
    text_tokens: int
    gradient_checkpointing: bool
    objective: str
    gradient_passes: tuple[float, ...]
    parameters: int
    trainable_parameters: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    ema_gb: float
    reference_gb: float
    activations_gb: float
    per_gpu_gb: float
    gpu_memory_gb: float
    fits: bool
    activations_per_sample_gb: float
    bank: "BankPlan | None" = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.bank is not None:
            out["bank"].update(gb=self.bank.gb, fits=self.bank.fits)
        return out


@dataclass
class _Model:
    """What a plan needs from the model: counts per block and the activation trace (cached per setup)."""

    parameters: int
    trainable: int
    block_params: list[int]
    block_trainable: list[int]
    trace: ActivationTrace


_MODEL_CACHE: dict[str, _Model] = {}


def _model_facts(cfg: Config, shapes: Shapes, dtype: torch.dtype) -> _Model:
    from apexdistill.models.build import build_meta_backbone

    key = json.dumps([cfg.model.model_dump(mode="json"), shapes.latent, shapes.text_len, shapes.text_dim, str(dtype)])
    if key not in _MODEL_CACHE:
        c, h, _ = shapes.latent
        backbone = build_meta_backbone(cfg.model, c, h, shapes.text_dim)
        params = list(backbone.parameters())
        blocks = backbone.blocks()
        _MODEL_CACHE[key] = _Model(
            parameters=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            block_params=[sum(p.numel() for p in b.parameters()) for b in blocks],
            block_trainable=[sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks],
            trace=trace_activations(backbone, shapes.latent, shapes.text_len, shapes.text_dim, dtype),
        )
    return _MODEL_CACHE[key]


def plan_memory(cfg: Config, shapes: Shapes | None = None) -> Plan:
    """The memory plan of ``cfg`` (see the module docstring for every term); ``shapes``, when given, is the
    sample instead of the one the config files describe (a benchmark's synthetic latents and captions)."""
    from apexdistill.method.base import build_objective

    t = cfg.train
    shapes = shapes or config_shapes(cfg)
    bf16 = t.use_bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    c = 2 if bf16 else 4
    facts = _model_facts(cfg, shapes, dtype)
    n = max(1, t.num_workers)
    P, T = facts.parameters, facts.trainable
    root = P - sum(facts.block_params)
    block, block_t = max(facts.block_params, default=0), max(facts.block_trainable, default=0)
    cuda = t.use_gpu
    if t.strategy in ("none", "ddp"):
        weights = 4 * P + (2 * T if bf16 else 0)
        grads = 4 * T
        optimizer = 8 * T + (4 * T if cuda else 0)
        shadow = 4 * T  # one more copy of the trained parameters (the EMA's, the kept teacher's)
    elif t.strategy == "fsdp2":
        weights = 4 * P / n + c * (root + 2 * block)
        grads = 4 * T / n + 4 * block_t
        optimizer = 8 * T / n + (4 * T / n if cuda else 0)
        shadow = 4 * T / n
    else:  # deepspeed ZeRO
        stage = t.deepspeed.stage
        weights = c * P if stage < 3 else c * P / n + 2 * c * block
        grads = c * T if stage == 1 else 4 * T / n + c * min(T, DEEPSPEED_BUCKET)
        optimizer = 0 if t.deepspeed.offload_optimizer else 12 * T / n + (4 * T / n if cuda else 0)
        shadow = c * T
    ema = shadow if t.ema_decay else 0
    kept_teacher = cfg.objective.name == "apex" and cfg.objective.apex.uses_frozen_reference and not cfg.model.lora.enabled
    reference = shadow if kept_teacher else 0
    objective = build_objective(cfg.objective)
    passes = tuple(objective.gradient_passes())
    batch = t.batch_size
    ckpt = t.gradient_checkpointing
    activations = batch * sum(passes) * facts.trace.kept(ckpt)
    if ckpt:  # backward recomputes one block at a time, for the largest pass
        activations += batch * max(passes) * max(facts.trace.blocks, default=0)
    peak = weights + optimizer + ema + reference + (grads + activations if t.grad_accum_steps > 1 else max(grads, activations))
    notes = list(shapes.notes)
    model = cfg.model.path or cfg.model.preset
    return Plan(
        family=cfg.model.backbone, model=model, strategy=t.strategy, workers=n, precision="bf16" if bf16 else "fp32",
        device="cuda" if cuda else "cpu", lora_rank=cfg.model.lora.rank if cfg.model.lora.enabled else None,
        batch_size=batch, grad_accum_steps=t.grad_accum_steps, resolution=cfg.data.resolution, latent=shapes.latent,
        text_tokens=shapes.text_len, gradient_checkpointing=ckpt, objective=cfg.objective.name, gradient_passes=passes,
        parameters=P, trainable_parameters=T, weights_gb=weights / GIB, gradients_gb=grads / GIB,
        optimizer_gb=optimizer / GIB, ema_gb=ema / GIB, reference_gb=reference / GIB, activations_gb=activations / GIB, per_gpu_gb=peak / GIB,
        gpu_memory_gb=t.gpu_memory_gb, fits=peak / GIB <= USABLE_FRACTION * t.gpu_memory_gb,
        activations_per_sample_gb=facts.trace.kept(ckpt) / GIB, bank=plan_bank(cfg, shapes), notes=notes,
    )


# ----------------------------------------------------------------------------- the consistency bank (host memory)


@dataclass
class BankPlan:
    rows: int
    renoised_rows: int
    row_bytes: int  # one one-step row's columns (three latents and the text index)
    renoised_row_bytes: int
    prompt_bytes: int  # one distinct prompt's text states and mask
    host_memory_gb: float

    @property
    def total_bytes(self) -> int:
        return self.rows * (self.row_bytes + self.prompt_bytes) + self.renoised_rows * self.renoised_row_bytes

    @property
    def gb(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.gb <= self.host_memory_gb

    def largest_fitting(self) -> int:
        """The largest consistency_bank_size whose bank fits train.host_memory_gb."""
        per_row = self.row_bytes + self.prompt_bytes + self.renoised_row_bytes * self.renoised_rows / max(self.rows, 1)
        return int(self.host_memory_gb * GIB // per_row)

    def line(self) -> str:
        latents = f"{self.rows} one-step rows" + (f" + {self.renoised_rows} re-noised" if self.renoised_rows else "")
        prompts = self.rows * self.prompt_bytes / GIB
        return (f"consistency bank (host memory, per worker): {self.gb:.2f} GB = {latents} x 3 fp32 latents "
                f"({(self.total_bytes - self.rows * self.prompt_bytes) / GIB:.2f} GB) + the text states of at most {self.rows} "
                f"distinct prompts ({prompts:.2f} GB); {'fits' if self.fits else 'does NOT fit'} "
                f"train.host_memory_gb={self.host_memory_gb:g}")


def plan_bank(cfg: Config, shapes: Shapes) -> BankPlan | None:
    """The consistency bank's host memory per worker (see the module docstring), or None without one."""
    a = cfg.objective.apex
    if cfg.objective.name != "apex" or not a.consistency_bank_size or not a.consistency_weight:
        return None
    c, h, w = shapes.latent
    latent = 4 * c * h * w
    n = a.consistency_bank_size
    renoised = max(1, round(n * a.consistency_renoise_fraction)) if a.consistency_renoise_t > 0 else 0
    return BankPlan(rows=n, renoised_rows=renoised, row_bytes=3 * latent + 8, renoised_row_bytes=3 * latent + 4 + 8,
                    prompt_bytes=shapes.text_len * (4 * shapes.text_dim + 8), host_memory_gb=cfg.train.host_memory_gb)


def check_bank_fits(cfg: Config, shapes: Shapes | None = None) -> BankPlan | None:
    """Refuse a consistency bank that does not fit ``train.host_memory_gb``, naming the largest that would."""
    bank = plan_bank(cfg, shapes or config_shapes(cfg))
    if bank is None or bank.fits:
        return bank
    raise ConfigError(f"objective.apex.consistency_bank_size={bank.rows}: the bank needs {bank.gb:.1f} GB of host memory per "
                      f"worker, more than train.host_memory_gb={bank.host_memory_gb:g} ({bank.line()}). Set "
                      f"objective.apex.consistency_bank_size={bank.largest_fitting()} or less, raise train.host_memory_gb if "
                      "the node has it, or objective.apex.consistency_bank_size=0 (fresh teacher targets every step)")


# ----------------------------------------------------------------------------- refusing what cannot fit


def _variant(cfg: Config, overrides: list[str]) -> Config:
    return build_config(cfg.model_dump(mode="json"), overrides)


def alternatives(cfg: Config) -> list[tuple[str, Plan]]:
    """What to change so the plan fits, each re-planned: checkpointing, LoRA, more workers, a smaller
    batch (with gradient accumulation keeping the global batch), one at a time."""
    t = cfg.train
    options: list[list[str]] = []
    if not t.gradient_checkpointing:
        options.append(["train.gradient_checkpointing=true"])
    lora = ["model.lora.enabled=true", "model.lora.rank=64", "model.lora.alpha=64"]
    if not cfg.model.lora.enabled:
        options.append(lora)
    if t.strategy in ("none", "ddp"):
        options.append(["train.strategy=fsdp2", f"train.num_workers={max(8, t.num_workers)}"])
    elif t.strategy == "fsdp2" or (t.strategy == "deepspeed" and t.deepspeed.stage == 3):
        options.append([f"train.num_workers={max(2, 2 * t.num_workers)}"])
    if t.batch_size > 1:
        options.append([f"train.batch_size={max(1, t.batch_size // 2)}", f"train.grad_accum_steps={2 * t.grad_accum_steps}"])
    if not t.gradient_checkpointing and t.batch_size > 1:
        options.append(["train.gradient_checkpointing=true", f"train.batch_size={max(1, t.batch_size // 2)}",
                        f"train.grad_accum_steps={2 * t.grad_accum_steps}"])
    if not t.gradient_checkpointing and not cfg.model.lora.enabled:  # the paper's Qwen-Image 20B run needs both
        options.append(["train.gradient_checkpointing=true", *lora])
    out = []
    for overrides in options:
        try:
            out.append((" ".join(overrides), plan_memory(_variant(cfg, overrides))))
        except (ConfigError, ValueError):
            continue  # a combination the config refuses is not advice
    return out


def check_plan_fits(cfg: Config) -> Plan | None:
    """Refuse a GPU run whose plan does not fit ``train.gpu_memory_gb``, naming what would fit.
    CPU runs (``train.use_gpu=false``) are not planned: there is no device memory to run out of."""
    if not cfg.train.use_gpu:
        return None
    plan = plan_memory(cfg)
    if plan.fits:
        return plan
    lines = [f"train: the memory plan needs {plan.per_gpu_gb:.1f} GB per GPU, more than {USABLE_FRACTION:.0%} of "
             f"train.gpu_memory_gb={cfg.train.gpu_memory_gb:g} ({_components(plan)}; `apexdistill plan` shows it all). "
             "Change one of:", *alternative_lines(cfg)]
    raise ConfigError("\n".join(lines))


def alternative_lines(cfg: Config) -> list[str]:
    """One line per alternative that ``alternatives`` re-planned: the overrides and what they need per GPU."""
    return [f"  {overrides}: {alt.per_gpu_gb:.1f} GB per GPU ({'fits' if alt.fits else 'still too much'})"
            for overrides, alt in alternatives(cfg)]


def _components(plan: Plan) -> str:
    return (f"weights {plan.weights_gb:.1f}, gradients {plan.gradients_gb:.1f}, optimizer {plan.optimizer_gb:.1f}, "
            f"EMA {plan.ema_gb:.1f}, teacher copy {plan.reference_gb:.1f}, activations {plan.activations_gb:.1f}")


def format_plan(plan: Plan) -> str:
    lora = f"LoRA rank {plan.lora_rank}" if plan.lora_rank else "full fine-tuning"
    ckpt = "on" if plan.gradient_checkpointing else "off"
    c, h, w = plan.latent
    rows = [
        f"{plan.family} {plan.model}: {plan.parameters / 1e9:.3f}B parameters, {plan.trainable_parameters / 1e6:,.1f}M trained ({lora})",
        f"{plan.strategy} x {plan.workers} worker(s), {plan.precision} on {plan.device}, batch {plan.batch_size} per GPU"
        f" x {plan.grad_accum_steps} accum, {plan.resolution} px -> {c}x{h}x{w}, {plan.text_tokens} text tokens, "
        f"{plan.objective} ({'+'.join(f'{p:g}B' for p in plan.gradient_passes)} with gradient), checkpointing {ckpt}",
        "",
        "| per GPU | GB |",
        "|---|---:|",
        f"| weights | {plan.weights_gb:.1f} |",
        f"| gradients | {plan.gradients_gb:.1f} |",
        f"| optimizer states | {plan.optimizer_gb:.1f} |",
        f"| EMA | {plan.ema_gb:.1f} |",
        *([f"| teacher copy (the frozen reference) | {plan.reference_gb:.1f} |"] if plan.reference_gb else []),
        f"| activations | {plan.activations_gb:.1f} |",
        f"| **peak** | **{plan.per_gpu_gb:.1f}** |",
        "",
        f"{'fits' if plan.fits else 'does NOT fit'} train.gpu_memory_gb={plan.gpu_memory_gb:g} "
        f"(a plan may use {USABLE_FRACTION:.0%} of it)",
    ]
    if plan.bank is not None:
        rows.append(plan.bank.line())
    rows.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(rows)


# ----------------------------------------------------------------------------- measuring on CPU


def measure_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch on the CPU while ``fn`` runs, above what was allocated before:
    the allocation and free events ``torch.profiler`` records (``profile_memory=True``), summed in
    time order. Exact for tensors; not the process's RSS (no Python objects, no allocator caching).
    Garbage of earlier work is collected first: freed during ``fn``, it would count against ``fn``'s peak."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
