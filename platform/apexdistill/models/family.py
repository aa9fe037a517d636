"""Model families: everything that differs between Sana, Qwen-Image and Z-Image, behind one interface.

A family is one module under ``apexdistill/models/`` (``sana.py``, ``qwenimage.py``, ``zimage.py``)
that defines a ``Family`` subclass and registers it with ``@register_family``. Everything
family-specific lives there:

- the diffusers classes (``pipeline_class``, ``transformer_class``) and the backbone adapter (the
  transformer call: time scale and sign, masks, packing, ``img_shapes``);
- prompt encoding, always through the pipeline class's own ``encode_prompt`` (``encode_prompts``,
  ``encode_negative``) and its settings' defaults (``prompt_defaults``);
- the CFG combination (``combine_cfg``) and the default guidance scale (the pipeline's own);
- how the pipeline sets its scheduler's timesteps (``set_timesteps``);
- default LoRA targets, the presets (``preset_config``: 'tiny' and 'small' sized for the data, and
  the published architectures in ``published_presets``) and a tiny pipeline built offline from the
  real classes (``build_tiny_pipeline``).

Nothing outside ``models/`` branches on a family's name: it asks ``get_family(name)`` or
``family_of_pipeline(folder)``. Adding a family means adding one module and its name to
``FAMILY_MODULES``.

Conventions shared by every family (the flow of APEX_METHOD.md): ``x_t = t*noise + (1-t)*x0``,
t = 1 is noise, the velocity is ``noise - x0``; latents are (B, C, H, W) in the normalized space the
transformer sees (the family's backbone packs them when its transformer wants tokens).
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: module name of each family (``apexdistill.models.<module>``); importing it registers the family
FAMILY_MODULES: dict[str, str] = {"sana": "sana", "qwenimage": "qwenimage", "zimage": "zimage"}
#: the pipeline components every supported family has (model_index.json keys)
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

_REGISTRY: dict[str, "Family"] = {}


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are encoded. ``None`` fields take the family's defaults (``prompt_defaults``),
    which are what the stock pipeline's ``__call__`` uses."""

    max_sequence_length: int | None = None
    negative_prompt: str | None = None
    #: Sana only: the "complex human instruction" lines prepended to each prompt
    complex_human_instruction: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Family:
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = "base"
    #: diffusers class names, as ``model_index.json`` and the transformer's config.json spell them
    pipeline_class: ClassVar[str] = ""
    transformer_class: ClassVar[str] = ""
    #: the backbone adapter (``apexdistill.models.backbone.Backbone`` subclass)
    backbone_class: ClassVar[type] = object
    #: module-name suffixes LoRA targets by default (attention and MLP projections)
    default_lora_targets: ClassVar[list[str]] = []
    #: name of the guidance argument of the pipeline's ``__call__`` (its default is the family's)
    guidance_argument: ClassVar[str] = "guidance_scale"
    #: the value of that argument that turns CFG off (what the exported student is called with)
    guidance_off: ClassVar[float] = 1.0
    #: extra arguments for exact comparisons with the stock pipeline (Sana snaps sizes to bins)
    exact_call_kwargs: ClassVar[dict[str, Any]] = {}

    # ---------------------------------------------------------------- classes

    def pipeline_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def transformer_cls(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def call_default(self, argument: str) -> Any:
        """The default of an argument of the pipeline's ``__call__`` (what a user running it gets)."""
        return inspect.signature(self.pipeline_cls().__call__).parameters[argument].default

    @property
    def default_guidance_scale(self) -> float:
        return float(self.call_default(self.guidance_argument))

    #: why a run of this family must state ``teacher.guidance_scale`` (its checkpoints are run at different scales),
    #: or None where the pipeline's ``__call__`` default is the documented usage of its checkpoints
    guidance_must_be_stated: ClassVar[str | None] = None

    def teacher_guidance_scale(self, stated: float | None) -> float:
        """The teacher's guidance: the run's ``teacher.guidance_scale``, else the documented usage (the pipeline's
        default), refused with the reason where the family's checkpoints differ."""
        if stated is not None:
            return float(stated)
        if self.guidance_must_be_stated:
            raise ValueError(f"teacher.guidance_scale: set it for a {self.pipeline_class} teacher: {self.guidance_must_be_stated}")
        return self.default_guidance_scale

    def text_dim(self, transformer_config: dict[str, Any]) -> int:
        """Width of the text states the transformer takes."""
        raise NotImplementedError

    def in_channels(self, transformer_config: dict[str, Any]) -> int:
        """Latent channels of the (unpacked) samples the transformer denoises."""
        raise NotImplementedError

    def patch_size(self, transformer_config: dict[str, Any]) -> int:
        """Spatial patch size: latent sizes must be multiples of it."""
        raise NotImplementedError

    # ---------------------------------------------------------------- prompts

    def prompt_defaults(self) -> PromptSettings:
        """``max_sequence_length`` and the negative prompt of the pipeline's ``__call__``."""
        return PromptSettings(
            max_sequence_length=int(self.call_default("max_sequence_length")),
            negative_prompt=self._default_negative_prompt(),
        )

    def _default_negative_prompt(self) -> str:
        default = self.call_default("negative_prompt")
        return default if isinstance(default, str) else ""

    def resolve_prompt_settings(self, settings: PromptSettings | None) -> PromptSettings:
        base = self.prompt_defaults()
        if settings is None:
            return base
        return PromptSettings(
            max_sequence_length=settings.max_sequence_length or base.max_sequence_length,
            negative_prompt=base.negative_prompt if settings.negative_prompt is None else settings.negative_prompt,
            complex_human_instruction=(base.complex_human_instruction if settings.complex_human_instruction is None
                                       else settings.complex_human_instruction),
            extra={**base.extra, **settings.extra},
        )

    def encode_prompts(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> tuple[Tensor, Tensor]:
        """Prompts -> (states (B, L, D) float32, mask (B, L) int64) with L = max_sequence_length, by
        calling ``pipe.encode_prompt`` (a pipeline object holding the text encoder and tokenizer).
        Positions past a prompt's tokens are zero with mask 0."""
        raise NotImplementedError

    def encode_negative(self, pipe: Any, settings: PromptSettings) -> tuple[Tensor, Tensor]:
        """The negative (unconditional) prompt as the pipeline encodes it for CFG: (1, L, D), (1, L)."""
        raise NotImplementedError

    def call_kwargs(self, settings: PromptSettings) -> dict[str, Any]:
        """The pipeline ``__call__`` arguments that encode prompts as ``settings`` do (what an exported student must be
        called with to see the text states it was trained on)."""
        return {"max_sequence_length": int(settings.max_sequence_length)}

    def token_count(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> list[int]:
        """Tokens per prompt before truncation (to report captions cut at max_sequence_length)."""
        tok = pipe.tokenizer(prompts, truncation=False, add_special_tokens=True)
        return [len(ids) for ids in tok["input_ids"]]

    # ---------------------------------------------------------------- guidance and sampling

    def uses_cfg(self, scale: float) -> bool:
        """Whether the pipeline applies CFG at this scale (Sana and Qwen: > 1)."""
        return scale > 1.0

    def combine_cfg(self, cond: Tensor, uncond: Tensor, scale: float, t: Tensor | None = None) -> Tensor:
        """The pipeline's CFG rule on velocities in our convention (B, C, H, W)."""
        return uncond + scale * (cond - uncond)

    def guidance_ratio(self, scale: float) -> float:
        """The pipeline's guidance number as the released APEX code's ``enhanced_ratio`` r, where the
        guided velocity is ``v_cond + r*(v_cond - v_uncond)`` (standard CFG with w = 1 + r)."""
        return max(0.0, float(scale) - 1.0)

    def guidance_scale_of_ratio(self, ratio: float) -> float:
        """The inverse of ``guidance_ratio``: the pipeline's guidance number whose CFG is ``v_cond + ratio*(v_cond - v_uncond)``."""
        return 1.0 + float(ratio)

    def guided_velocity(self, cond: Tensor, uncond: Tensor, t: Tensor | None, ratio: float) -> Tensor:
        """What the teacher pipeline runs at guidance ratio ``ratio``: its own CFG rule (``combine_cfg``) at the scale
        of that ratio. The guided distillation targets use it, so the student learns the field the teacher samples."""
        return self.combine_cfg(cond, uncond, self.guidance_scale_of_ratio(ratio), t)

    def set_timesteps(self, scheduler: Any, nfe: int, latent_shape: tuple[int, int, int], device: torch.device | str) -> Tensor:
        """Set up ``scheduler`` as the pipeline's ``__call__`` does for ``nfe`` steps; returns its timesteps."""
        scheduler.set_timesteps(nfe, device=device)
        return scheduler.timesteps

    def model_time(self, scheduler: Any, timestep: Tensor) -> Tensor:
        """Scheduler timestep -> our t in [0, 1] (the backbone maps it to what the transformer takes)."""
        return timestep.float() / float(scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def sample(
        self,
        model: Any,
        scheduler: Any,
        z: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        nfe: int,
        guidance_scale: float,
        neg_text: Tensor | None = None,
        neg_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        sigmas: list[float] | None = None,
    ) -> Tensor:
        """The teacher as users run it: the pipeline's own scheduler (whatever class it ships), set up
        as the pipeline's ``__call__`` sets it, with the family's CFG rule. ``model(x, t, text, mask)``
        is a backbone (velocity in our convention); ``z`` the initial noise (B, C, H, W). For the same
        prompt embeddings, noise and step count this reproduces ``pipe(..., output_type="latent")``
        (tests/test_family_*.py measure it per family). ``sigmas`` set the schedule explicitly, as
        ``pipe(..., sigmas=...)`` does (the exported student's call)."""
        cfg = self.uses_cfg(guidance_scale)
        if cfg and neg_text is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the negative prompt's embedding (neg_text)")
        b = z.shape[0]
        if cfg:
            neg_text = neg_text.to(z.device).expand(b, -1, -1)
            neg_mask = neg_mask.to(z.device).expand(b, -1) if neg_mask is not None else None
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=list(sigmas), device=z.device)
            timesteps = scheduler.timesteps
        else:
            timesteps = self.set_timesteps(scheduler, nfe, tuple(z.shape[1:]), z.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        x = z.float()
        for timestep in timesteps:
            t = self.model_time(scheduler, timestep).to(z.device).expand(b)
            v = model(x, t, text, text_mask).float()
            if cfg:
                v = self.combine_cfg(v, model(x, t, neg_text, neg_mask).float(), guidance_scale, t)
            x = self.scheduler_step(scheduler, v, timestep, x, generator)
        return x

    #: whether the pipeline hands its ``generator`` to ``scheduler.step`` (Sana); Qwen-Image and
    #: Z-Image let a stochastic scheduler draw from the global RNG
    step_uses_generator: ClassVar[bool] = False

    def scheduler_step(self, scheduler: Any, v: Tensor, timestep: Tensor, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """One ``scheduler.step`` as the pipeline makes it (layout and random draws included)."""
        use = self.step_uses_generator and generator is not None and "generator" in inspect.signature(scheduler.step).parameters
        return scheduler.step(v, timestep, x, return_dict=False, **({"generator": generator} if use else {}))[0]

    @torch.no_grad()
    def sample_student(self, model: Any, z: Tensor, text: Tensor, text_mask: Tensor | None, nfe: int,
                       generator: torch.Generator | None = None) -> Tensor:
        """The distilled student as the exported stock pipeline runs it: the student scheduler
        (``models.pipeline.STUDENT_SCHEDULER``) at ``student_sigmas(nfe)``, guidance off. Draws its
        re-noise as the pipeline does (``generator`` for Sana, else the global RNG: seed it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from apexdistill.models.pipeline import STUDENT_SCHEDULER, student_sigmas

        scheduler = FlowMatchEulerDiscreteScheduler(**STUDENT_SCHEDULER)
        return self.sample(model, scheduler, z, text, text_mask, nfe, self.guidance_off,
                           generator=generator, sigmas=student_sigmas(nfe))

    # ---------------------------------------------------------------- presets and tiny pipelines

    #: presets every family has, sized for the data (``in_channels``, ``sample_size``, ``text_dim``)
    SIZED_PRESETS: ClassVar[tuple[str, ...]] = ("tiny", "small")
    #: the family's published transformer architectures by ``model.preset`` name: diffusers config
    #: kwargs, built with random weights (never downloaded). Their latent channels and text width are
    #: the published ones, whatever the data; ``apexdistill plan`` sizes a run of them.
    published_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: pixels per latent cell of the VAE the published pipelines ship (for plans at a pixel resolution)
    vae_downsample: ClassVar[int] = 8
    #: the side the published checkpoints generate at by default (their pipelines' 1024 x 1024): what `plan` assumes
    published_resolution: ClassVar[int] = 1024

    def preset_names(self) -> list[str]:
        return [*self.SIZED_PRESETS, *self.published_presets]

    def check_preset(self, preset: str) -> None:
        if preset not in self.preset_names():
            owner = next((f.name for f in all_families() if preset in f.published_presets), None)
            hint = f" ('{preset}' is a {owner} architecture: set model.backbone={owner})" if owner else ""
            raise ValueError(f"model.preset: unknown preset '{preset}' for {self.name}; choose one of {self.preset_names()}{hint}")

    def preset_config(self, preset: str, in_channels: int, sample_size: int, text_dim: int, target_time: bool = False) -> dict[str, Any]:
        """The transformer's config kwargs for ``model.preset``: a published architecture as published
        (``in_channels``, ``sample_size`` and ``text_dim`` are then ignored: the build checks the data
        against it), or a sized preset (``sized_preset_config``)."""
        self.check_preset(preset)
        if preset in self.published_presets:
            return self.published_config(preset, target_time)
        return self.sized_preset_config(preset, in_channels, sample_size, text_dim, target_time)

    def published_config(self, preset: str, target_time: bool = False) -> dict[str, Any]:
        return dict(self.published_presets[preset])

    def sized_preset_config(self, preset: str, in_channels: int, sample_size: int, text_dim: int, target_time: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def build_tiny_pipeline(self, folder: str | Path, *, seed: int = 0, text_dim: int | None = None) -> Path:
        """A complete, tiny stock pipeline of this family built offline from the real classes (random
        weights), saved with ``save_pretrained``: what tests load through ``model.path``."""
        raise NotImplementedError


def register_family(cls: type[Family]) -> type[Family]:
    _REGISTRY[cls.name] = cls()
    return cls


def family_names() -> list[str]:
    return sorted(FAMILY_MODULES)


def get_family(name: str) -> Family:
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown model family '{name}'; supported: {family_names()}")
    if name not in _REGISTRY:
        importlib.import_module(f"apexdistill.models.{FAMILY_MODULES[name]}")
    return _REGISTRY[name]


def all_families() -> list[Family]:
    return [get_family(n) for n in family_names()]


def family_of_transformer_class(class_name: str) -> Family | None:
    return next((f for f in all_families() if f.transformer_class == class_name), None)


def family_of_pipeline_class(class_name: str) -> Family | None:
    return next((f for f in all_families() if f.pipeline_class == class_name), None)


def read_model_index(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model.path: '{path}' is not valid JSON: {exc}") from None


def family_of_pipeline(folder: str | Path) -> Family:
    """The family of a stock pipeline folder, from its ``model_index.json`` (``_class_name``)."""
    index = read_model_index(folder)
    if index is None:
        raise FileNotFoundError(f"model.path: '{folder}' has no model_index.json (not a diffusers pipeline folder)")
    class_name = index.get("_class_name", "")
    family = family_of_pipeline_class(class_name)
    if family is None:
        supported = ", ".join(f"{f.pipeline_class} ({f.name})" for f in all_families())
        raise ValueError(f"model.path: '{folder}' is a {class_name or 'pipeline without _class_name'}, "
                         f"which no supported family runs; supported pipelines: {supported}")
    return family


def pad_to(states: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad (or cut) text states (B, L, D) and mask (B, L) to ``length`` positions; padded
    positions are zero with mask 0."""
    b, n, d = states.shape
    if n >= length:
        return states[:, :length], mask[:, :length]
    pad_s = states.new_zeros((b, length - n, d))
    pad_m = mask.new_zeros((b, length - n))
    return torch.cat([states, pad_s], 1), torch.cat([mask, pad_m], 1)
