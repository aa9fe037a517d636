"""A local diffusers-style pipeline folder: what a trained model is exported as, and what a real
checkpoint looks like.

    FOLDER/transformer/   config.json + diffusion_pytorch_model.safetensors (save_pretrained),
                          target_time.safetensors when the backbone keeps weights outside it
    FOLDER/vae/           AutoencoderKL (when the model works in latent space)
    FOLDER/text_encoder/  + tokenizer/  (copied on request; a real pipeline ships them)
    FOLDER/apexdistill.json  family, target time, text encoder and VAE identities, extra metadata

``build_backbone(ModelConfig(path=FOLDER, ...))`` loads it with diffusers' ``from_pretrained``
exactly as it loads a real checkpoint; ``build_vae(VaeConfig(path=FOLDER))`` finds ``vae/``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from apexdistill.config import ModelConfig
from apexdistill.models.backbone import TARGET_TIME_WEIGHTS, Backbone
from apexdistill.models.family import family_of_transformer_class, get_family
from apexdistill.models.vae import PixelSpace, Vae

META_FILE = "apexdistill.json"
META_FORMAT = 1
_TOKENIZER_FILES = ("tokenizer", "vocab", "special_tokens_map", "merges", "spiece", "added_tokens", "sentencepiece")


def _text_encoder_meta(text_encoder: Any) -> dict[str, Any] | None:
    """``text_encoder`` is a local folder or an object with ``.path`` (and ``.identity``), e.g. TextEncoder."""
    if text_encoder is None:
        return None
    path = Path(getattr(text_encoder, "path", text_encoder))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder folder '{path}' has no config.json")
    config = json.loads((path / "config.json").read_text())
    dim = config.get("hidden_size") or config.get("d_model")
    return {
        "path": str(path.resolve()),
        "identity": getattr(text_encoder, "identity", f"{path.name}:d{dim}"),
        "dim": dim,
        "model_type": config.get("model_type"),
    }


def _copy_text_encoder(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst / "text_encoder", ignore=shutil.ignore_patterns(".git*", "README*"))
    (dst / "tokenizer").mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name.startswith(_TOKENIZER_FILES):
            shutil.copy2(f, dst / "tokenizer" / f.name)


def _publish(tmp: Path, folder: Path) -> None:
    """Move a fully written ``tmp`` folder into place (an existing ``folder`` is replaced only now)."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def save_pipeline(
    folder: str | Path,
    backbone: Backbone,
    text_encoder: Any = None,
    vae: Vae | PixelSpace | None = None,
    extra_meta: dict[str, Any] | None = None,
    *,
    copy_text_encoder: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``backbone`` (LoRA merged into a copy, the live model is untouched), the VAE and the
    metadata as a pipeline folder. The folder is written next to its destination and moved into
    place at the end, so a failure never leaves a half-written export, and an existing export is
    only replaced with ``overwrite=True``."""
    from apexdistill.models.lora import has_lora, merge_lora

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"export folder '{folder}' already exists and is not empty (pass overwrite=True to replace it)")
    te_meta = _text_encoder_meta(text_encoder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        lora_merged = has_lora(backbone)
        export = merge_lora(copy.deepcopy(backbone)) if lora_merged else backbone
        export.transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        extra = {k: v.detach().cpu().contiguous() for k, v in export.extra_state_dict().items()}
        if extra:
            save_file(extra, str(tmp / "transformer" / TARGET_TIME_WEIGHTS))
        if isinstance(vae, Vae):
            vae.autoencoder.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        if te_meta is not None and copy_text_encoder:
            _copy_text_encoder(Path(te_meta["path"]), tmp)
        meta = {
            "format": META_FORMAT,
            "family": backbone.family,
            "transformer_class": get_family(backbone.family).transformer_class,
            "target_time": bool(backbone.target_time),
            "in_channels": backbone.in_channels,
            "text_dim": backbone.text_dim,
            "lora_merged": lora_merged,
            "text_encoder": te_meta,
            "vae": {"identity": vae.identity, "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor}
            if isinstance(vae, Vae)
            else None,
            "extra": extra_meta or {},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_pipeline_parts(folder: str | Path) -> dict[str, Any]:
    """Locate the parts of a pipeline folder (ours or a real diffusers one). Returns a dict with
    ``folder``, ``transformer``, ``vae``, ``text_encoder``, ``tokenizer`` (paths or None),
    ``family``, ``target_time`` and ``meta`` (the contents of apexdistill.json, or {})."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path: pipeline folder '{folder}' does not exist")
    if not (folder / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"model.path: '{folder}' has no transformer/config.json (not a diffusers pipeline folder)")
    meta: dict[str, Any] = {}
    if (folder / META_FILE).is_file():
        meta = json.loads((folder / META_FILE).read_text())

    def part(name: str) -> Path | None:
        sub = folder / name
        return sub if sub.is_dir() and any(sub.iterdir()) else None

    text_encoder = part("text_encoder")
    recorded = (meta.get("text_encoder") or {}).get("path")
    if text_encoder is None and recorded and Path(recorded).is_dir():
        text_encoder = Path(recorded)  # not copied: the encoder the model was trained with
    tokenizer = part("tokenizer") or text_encoder
    config = json.loads((folder / "transformer" / "config.json").read_text())
    # without our metadata (a real checkpoint): a target-time embedding shows as Qwen's extra
    # weights file or as Sana's guidance embedding
    has_target = (folder / "transformer" / TARGET_TIME_WEIGHTS).is_file() or bool(config.get("guidance_embeds", False))
    return {
        "folder": folder,
        "transformer": folder / "transformer",
        "vae": folder / "vae" if (folder / "vae" / "config.json").is_file() else None,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "family": meta.get("family") or getattr(family_of_transformer_class(config.get("_class_name", "")), "name", None),
        "target_time": bool(meta.get("target_time", has_target)),
        "meta": meta,
    }


def pipeline_model_config(folder: str | Path, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` that loads ``folder`` (family and target time taken from the folder)."""
    parts = load_pipeline_parts(folder)
    if parts["family"] is None:
        raise ValueError(f"model.path: cannot tell the backbone family of '{folder}'; set model.backbone")
    fields = {"backbone": parts["family"], "path": str(folder), "target_time": parts["target_time"], **overrides}
    return ModelConfig(**fields)


# ----------------------------------------------------------------------------- stock pipeline folders in


def check_stock_pipeline(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """(family, model_index) of a stock pipeline folder, refusing one that cannot be distilled: an
    unsupported pipeline class (naming the supported ones) or a missing component."""
    from apexdistill.models.family import PIPELINE_PARTS, family_of_pipeline, read_model_index

    folder = Path(folder)
    family = family_of_pipeline(folder)
    index = read_model_index(folder) or {}
    for part in PIPELINE_PARTS:
        entry = index.get(part)
        listed = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
        sub = folder / part
        present = sub.is_dir() and any(sub.iterdir())
        if not listed or not present:
            why = "model_index.json does not list it" if not listed else f"'{sub}' is missing or empty"
            raise FileNotFoundError(
                f"model.path: the {family.pipeline_class} at '{folder}' has no {part} ({why}); a stock pipeline folder "
                f"holds {', '.join(PIPELINE_PARTS)}")
    return family, index


def pipeline_defaults(cfg: Any, explicit: dict[str, bool]) -> dict[str, Any]:
    """Config values implied by a stock pipeline folder in ``model.path`` (dotted key -> value), after
    the checks that must fail before any compute: family, components, text width, resolution."""
    from apexdistill.models.text import pipeline_encoder_info
    from apexdistill.models.vae import read_vae_config

    folder = Path(cfg.model.path).expanduser()
    family, _ = check_stock_pipeline(folder)
    if explicit["model.backbone"] and cfg.model.backbone != family.name:
        raise ValueError(f"model.backbone is '{cfg.model.backbone}' but model.path '{folder}' is a {family.pipeline_class} "
                         f"({family.name}); leave model.backbone unset with a pipeline folder")
    updates: dict[str, Any] = {"model.backbone": family.name}
    te = cfg.text_encoder
    kind = te.kind if explicit["text_encoder.kind"] else "pipeline"
    updates["text_encoder.kind"] = kind
    if kind == "pipeline":
        updates["text_encoder.path"] = te.path or str(folder)
        updates["text_encoder.max_length"] = te.max_length or family.prompt_defaults().max_sequence_length
    else:
        updates["text_encoder.max_length"] = te.max_length or 16
    vae_path = cfg.vae.path if explicit["vae.path"] else str(folder)
    updates["vae.path"] = vae_path
    vae_folder, vae_conf, vae_cls = read_vae_config(vae_path)
    image_channels = vae_cls.config_image_channels(vae_conf)
    if explicit["data.channels"] and cfg.data.channels != image_channels:
        raise ValueError(f"data.channels={cfg.data.channels} but the VAE at '{vae_folder}' takes {image_channels}-channel images")
    updates["data.channels"] = image_channels

    # the transformer must take what the text encoder gives, at a size the VAE and patching allow
    t_conf = json.loads((folder / "transformer" / "config.json").read_text())
    want = family.text_dim(t_conf)
    if kind == "pipeline":
        where = updates["text_encoder.path"]
        got = pipeline_encoder_info(te.model_copy(update={"path": where, "max_length": updates["text_encoder.max_length"]}))["dim"]
    else:  # the user's own encoder (MiniLM or a transformers folder): its width must fit too
        from apexdistill.models.text import minilm_path

        where = te.path if kind == "transformers" else minilm_path()
        conf = json.loads((Path(where) / "config.json").read_text())
        got = conf.get("hidden_size") or (conf.get("text_config") or {}).get("hidden_size")
    if got != want:
        raise ValueError(f"model.path: the transformer at '{folder / 'transformer'}' takes text states of width {want} "
                         f"but the text encoder at '{where}' gives {got} (hidden_size); use the pipeline's own "
                         f"(text_encoder.kind=pipeline) or one of width {want}")
    step = vae_cls.config_downsample(vae_conf) * family.patch_size(t_conf)
    if cfg.data.resolution % step:
        raise ValueError(f"data.resolution={cfg.data.resolution} is not a multiple of the VAE factor "
                         f"{vae_cls.config_downsample(vae_conf)} x the transformer's patch size {family.patch_size(t_conf)} = {step}")

    scale = family.teacher_guidance_scale(cfg.teacher.guidance_scale)  # the documented usage, or refused with why
    updates["teacher.guidance_scale"] = scale
    ratio = cfg.objective.apex.guidance_ratio
    updates["objective.apex.guidance_ratio"] = family.guidance_ratio(scale) if ratio is None else ratio
    return updates


# ----------------------------------------------------------------------------- stock pipeline folders out

#: the scheduler that runs a distilled student as it was trained (APEX_METHOD.md's few-step sampler:
#: x0 = x - sigma*v, then re-noise to the next sigma), verified against our sampler in the tests
STUDENT_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False, shift_terminal=None, stochastic_sampling=True,
                         use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)


def student_sigmas(nfe: int) -> list[float]:
    """The few-step sampler's grid without its final 0 (the scheduler appends it): ``sigmas=`` of the call."""
    from apexdistill.method.sampler import few_step_grid

    return few_step_grid(nfe)[:-1]
MODEL_CARD = "README.md"


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        dst.symlink_to(src.resolve(), target_is_directory=True)
    else:
        shutil.copytree(src, dst, symlinks=False)


def model_card(family: Any, teacher: Path, meta: dict[str, Any], call: dict[str, Any] | None = None) -> str:
    """The card: where the student came from and the exact ``pipe(...)`` calls that run it as it was trained."""
    call = call or {family.guidance_argument: family.guidance_off, **family.exact_call_kwargs}
    args = "".join(f", {k}={v!r}" for k, v in call.items())
    sigmas = {n: student_sigmas(n) for n in (1, 2)}
    return f"""# One-step {family.pipeline_class} distilled with APEX (apexdistill)

Teacher: `{teacher}`. Student: `transformer/` ({'LoRA merged' if meta.get('lora_merged') else 'full weights'},
{'EMA' if meta.get('ema', True) else 'raw'} weights, {meta.get('dtype', 'float32')}), objective `{meta.get('objective')}`,
{meta.get('steps', '?')} steps. The VAE, text encoder and tokenizer are the ones the run trained with
({meta.get('components_from', 'the teacher')}). The scheduler is `FlowMatchEulerDiscreteScheduler` with shift 1, no dynamic
or terminal shift and `stochastic_sampling=True`, which is the sampler the student was trained for.

Call it with these arguments (in `apexdistill.json` as `call` and `sigmas`): they are how the run encoded its prompts
and how it samples. The pipeline's own defaults (20-50 steps, CFG, its default prompt settings) run a different model.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("<this folder>", torch_dtype=torch.bfloat16).to("cuda")
image = pipe("a photo of a cat", sigmas={sigmas[1]}{args}).images[0]          # 1 NFE
image = pipe("a photo of a cat", sigmas={sigmas[2]}{args}).images[0]     # 2 NFE
```

Guidance is off: it was distilled into the student (`objective.apex.guidance_ratio` =
{meta.get('guidance_ratio')}, the teacher's guidance {meta.get('teacher_guidance_scale')}). `lora/` (LoRA runs only)
holds the adapter alone for `pipe.load_lora_weights(...)` on the teacher pipeline with this scheduler.
"""


def save_stock_pipeline(
    folder: str | Path,
    backbone: Backbone,
    teacher: str | Path,
    *,
    link: bool = False,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
    components: dict[str, Path] | None = None,
    call: dict[str, Any] | None = None,
    dtype: Any = None,
) -> Path:
    """Write a complete stock pipeline folder that ``DiffusionPipeline.from_pretrained`` runs: the
    teacher's ``model_index.json`` (scheduler replaced), the student transformer (LoRA merged into a
    copy, saved in ``dtype``, default float32), the VAE, text encoder and tokenizer (the teacher's, or the folders
    in ``components`` that the run trained with; copied, or symlinked with ``link``), the student scheduler, a model
    card with the exact ``call`` arguments, and ``lora/`` for LoRA runs (``load_lora_weights`` format, with the
    adapter metadata so alpha survives). Written next to the destination and moved into place, so a failure never
    leaves a half-written export."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from apexdistill.models.lora import has_lora, merge_lora

    if backbone.target_time:
        raise ValueError("a run trained with model.target_time=true needs a target-time input that the stock pipeline "
                         "does not pass; it cannot be exported as a stock pipeline folder")
    teacher = Path(teacher)
    family, index = check_stock_pipeline(teacher)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"export folder '{folder}' already exists and is not empty (pass --overwrite to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    meta = dict(meta or {})
    try:
        lora = has_lora(backbone)
        merged = merge_lora(copy.deepcopy(backbone)) if lora else backbone
        transformer = merged.transformer if dtype is None else copy.deepcopy(merged.transformer).to(dtype)
        transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        for part in ("vae", "text_encoder", "tokenizer"):
            _place((components or {}).get(part) or teacher / part, tmp / part, link)
        FlowMatchEulerDiscreteScheduler(**STUDENT_SCHEDULER).save_pretrained(str(tmp / "scheduler"))
        new_index = {**index, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2))
        if lora:
            save_pipeline_lora(backbone, tmp / "lora", family)
        meta.update(lora_merged=lora, family=family.name, teacher=str(teacher.resolve()), linked=link,
                    dtype=str(dtype or "torch.float32").replace("torch.", ""))
        call = call or {family.guidance_argument: family.guidance_off, **family.exact_call_kwargs}
        meta.update(call=call, sigmas={str(n): student_sigmas(n) for n in (1, 2, 4)})
        (tmp / MODEL_CARD).write_text(model_card(family, teacher, meta, call))
        (tmp / META_FILE).write_text(json.dumps({"format": META_FORMAT, "stock_pipeline": True, **meta}, indent=2, default=str))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_pipeline_lora(backbone: Backbone, folder: Path, family: Any) -> Path:
    """The adapter in the layout ``pipe.load_lora_weights(folder)`` reads: ``transformer.``-prefixed
    peft keys in ``pytorch_lora_weights.safetensors``, with the peft config as adapter metadata."""
    from peft import get_peft_model_state_dict

    from apexdistill.models.lora import ADAPTER_NAME

    transformer = backbone.transformer
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME).items()}
    config = transformer.peft_config[ADAPTER_NAME].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    family.pipeline_cls().save_lora_weights(str(folder), transformer_lora_layers=state, transformer_lora_adapter_metadata=config)
    return folder
