"""Build a backbone from config: a tiny preset, or a transformer from a local diffusers folder
(a stock pipeline folder, a real checkpoint or one written by ``apexdistill export``: the same code
path), then LoRA when ``model.lora.enabled``. The family (``models/<family>.py``) supplies the
transformer class, the adapter and the presets."""

from __future__ import annotations

import json
from pathlib import Path

from apexdistill.assets import resolve_model_path
from apexdistill.config import ModelConfig
from apexdistill.models.backbone import TARGET_TIME_WEIGHTS, Backbone, load_target_time
from apexdistill.models.family import all_families, family_of_transformer_class, get_family


def resolve_part_folder(path: str | Path, part: str, field: str) -> Path:
    """A diffusers pipeline folder (with ``part/config.json``) or the part's own folder (config.json)."""
    p = Path(path)
    if (p / part / "config.json").is_file():
        return p / part
    if (p / "config.json").is_file():
        return p
    raise FileNotFoundError(
        f"{field}: '{p}' is neither a diffusers pipeline folder ({part}/config.json) nor a {part} folder (config.json)"
    )


def resolve_transformer_folder(path: str | Path) -> Path:
    return resolve_part_folder(path, "transformer", "model.path")


def _check_class(folder: Path, family: str) -> None:
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model.path: cannot read '{folder / 'config.json'}': {exc}") from None
    expected = get_family(family).transformer_class
    if class_name and class_name != expected:
        other = family_of_transformer_class(class_name)
        hint = (f"; set model.backbone={other.name}" if other
                else f" (supported: {sorted(f.transformer_class for f in all_families())})")
        raise ValueError(f"model.backbone is '{family}' ({expected}) but '{folder}' holds a {class_name}{hint}")


def build_backbone(cfg: ModelConfig, in_channels: int, sample_size: int, text_dim: int) -> Backbone:
    family = get_family(cfg.backbone)
    cls = family.transformer_cls()
    folder: Path | None = None
    if cfg.path:
        folder = resolve_transformer_folder(resolve_model_path(cfg.path))  # 'builtin:teacher' or a folder
        _check_class(folder, cfg.backbone)
        transformer = cls.from_pretrained(str(folder), local_files_only=True)
    else:
        transformer = cls(**family.preset_config(cfg.preset, in_channels, sample_size, text_dim, cfg.target_time))
    backbone = family.backbone_class(transformer, target_time=cfg.target_time)
    if folder is not None and (folder / TARGET_TIME_WEIGHTS).is_file():
        if not cfg.target_time:
            raise ValueError(
                f"model.target_time: '{folder}' was saved with a target-time embedding ({TARGET_TIME_WEIGHTS}); set model.target_time=true"
            )
        load_target_time(backbone, folder / TARGET_TIME_WEIGHTS)
    _check_data(cfg, backbone, in_channels, text_dim)
    if cfg.lora.enabled:
        from apexdistill.models.lora import apply_lora

        apply_lora(backbone, cfg.lora)
    return backbone


def _check_data(cfg: ModelConfig, backbone: Backbone, in_channels: int, text_dim: int) -> None:
    published = not cfg.path and cfg.preset in get_family(cfg.backbone).published_presets
    what = f"model.preset='{cfg.preset}' is the published architecture: it" if published else "model: the transformer"
    if backbone.in_channels != in_channels:
        raise ValueError(f"{what} takes {backbone.in_channels}{' latent' if published else ''} channels but the data has {in_channels}"
                         + (" (use the family's own VAE: vae.path)" if published else ""))
    if backbone.text_dim != text_dim:
        raise ValueError(f"{what} expects text states of width {backbone.text_dim}, the text encoder gives {text_dim}"
                         + (" (use the family's own text encoder)" if published else ""))


def build_meta_backbone(cfg: ModelConfig, in_channels: int, sample_size: int, text_dim: int) -> Backbone:
    """The architecture ``build_backbone`` builds, LoRA adapters included, on the meta device: every
    parameter has its shape and dtype and no storage, and nothing beyond ``config.json`` is read from
    ``model.path``. What ``apexdistill plan`` counts and traces; a 20B model costs a second."""
    import torch

    family = get_family(cfg.backbone)
    cls = family.transformer_cls()
    with torch.device("meta"):
        if cfg.path:
            folder = resolve_transformer_folder(resolve_model_path(cfg.path))
            _check_class(folder, cfg.backbone)
            transformer = cls.from_config(cls.load_config(str(folder)))
        else:
            transformer = cls(**family.preset_config(cfg.preset, in_channels, sample_size, text_dim, cfg.target_time))
        backbone = family.backbone_class(transformer, target_time=cfg.target_time)
        if cfg.lora.enabled:
            from apexdistill.models.lora import apply_lora

            apply_lora(backbone, cfg.lora)
    return backbone
