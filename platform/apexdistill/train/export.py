"""Turn a training checkpoint into a model: load it back into the backbone, or export a pipeline folder."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from apexdistill.config import Config, dump_yaml, load_config
from apexdistill.models.backbone import Backbone
from apexdistill.models.build import build_backbone
from apexdistill.models.pipeline import save_pipeline
from apexdistill.train.data import DataShapes
from apexdistill.train.loop import CHECKPOINT_STATE, latest_checkpoint


def resolve_checkpoint(path: str | Path) -> tuple[Config, Path]:
    """A run folder (``<workdir>/runs/<name>``) or one of its ``checkpoints/step_*`` folders."""
    p = Path(path)
    if (p / CHECKPOINT_STATE).is_file():
        run_folder, ckpt = p.parent.parent, p
    else:
        run_folder, ckpt = p, latest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"'{p}' holds no finished checkpoint (expected {p}/checkpoints/step_*/{CHECKPOINT_STATE})")
    cfg_file = run_folder / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"'{run_folder}' has no config.yaml: is it a run folder made by 'apexdistill train'?")
    return load_config(cfg_file), ckpt


def load_trained_backbone(path: str | Path, use_ema: bool = True) -> tuple[Backbone, Config]:
    cfg, ckpt = resolve_checkpoint(path)
    shapes = DataShapes.load(ckpt.parent.parent)
    backbone = build_backbone(cfg.model, shapes.channels, shapes.resolution, shapes.text_dim)
    weights = ckpt / ("ema.safetensors" if use_ema and (ckpt / "ema.safetensors").is_file() else "model.safetensors")
    backbone.load_state_dict(load_file(str(weights)))
    return backbone.eval(), cfg


def export_pipeline(path: str | Path, out: str | Path, use_ema: bool = True, overwrite: bool = False) -> Path:
    """A diffusers pipeline folder (``transformer/``, LoRA merged, plus the resolved training config)."""
    backbone, cfg = load_trained_backbone(path, use_ema)
    folder = save_pipeline(out, backbone, extra_meta={"ema": use_ema, "objective": cfg.objective.name}, overwrite=overwrite)
    dump_yaml(cfg, Path(folder) / "train_config.yaml")
    return Path(folder)
