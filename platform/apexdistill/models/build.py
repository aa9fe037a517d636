"""Build a backbone from config: a tiny preset, or a transformer from a local diffusers folder."""

from __future__ import annotations

from pathlib import Path

from apexdistill.config import ModelConfig
from apexdistill.models.backbone import FAMILIES, Backbone, preset_config, transformer_class


def resolve_transformer_folder(path: str | Path) -> Path:
    """A pipeline folder (with transformer/) or a transformer folder (with config.json)."""
    p = Path(path)
    if (p / "transformer" / "config.json").is_file():
        return p / "transformer"
    if (p / "config.json").is_file():
        return p
    raise FileNotFoundError(
        f"model.path: '{p}' is neither a diffusers pipeline folder (transformer/config.json) nor a transformer folder (config.json)"
    )


def build_backbone(cfg: ModelConfig, in_channels: int, sample_size: int, text_dim: int) -> Backbone:
    cls = transformer_class(cfg.backbone)
    if cfg.path:
        transformer = cls.from_pretrained(str(resolve_transformer_folder(cfg.path)), local_files_only=True)
    else:
        transformer = cls(**preset_config(cfg.backbone, cfg.preset, in_channels, sample_size, text_dim, cfg.target_time))
    backbone = FAMILIES[cfg.backbone](transformer, target_time=cfg.target_time)
    if backbone.in_channels != in_channels:
        raise ValueError(f"model: the transformer takes {backbone.in_channels} channels but the data has {in_channels}")
    if backbone.text_dim != text_dim:
        raise ValueError(f"model: the transformer expects text states of width {backbone.text_dim}, the text encoder gives {text_dim}")
    return backbone
