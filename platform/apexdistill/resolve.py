"""A config resolved against the files it names: the defaults a stock pipeline folder in ``model.path`` implies
(family, text encoder and prompt settings, VAE, channels, teacher guidance and the guidance ratio), the family's
presets, and the data's buckets. It sits above ``models/`` and ``data/``; ``config.py`` stays a pure schema (it
imports nothing of ours) and calls ``resolve_defaults`` on every config it builds through the hook this module
registers (``apexdistill/__init__.py`` registers it lazily, so importing the schema loads no model code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from apexdistill.config import Config, ConfigError, _format_errors, _set_dotted

DEFAULT_TEXT_LENGTH = 16  # MiniLM / transformers encoders


def resolve_defaults(cfg: "Config", source: str = "<config>") -> "Config":
    """Fill the defaults that depend on other settings and files: the family's presets are checked; with a stock
    pipeline folder in
    ``model.path`` the family, text encoder, VAE, prompt length, teacher guidance and guidance ratio
    come from the pipeline (``apexdistill.models.pipeline.pipeline_defaults``, which also refuses a
    pipeline that cannot work, naming what is wrong); otherwise MiniLM at 16 tokens, no guidance."""
    if not cfg.model.path:  # with model.path the architecture is the folder's; the preset is unused
        from apexdistill.models.family import get_family  # the family module owns its presets

        try:
            get_family(cfg.model.backbone).check_preset(cfg.model.preset)
        except ValueError as exc:
            raise ConfigError(f"invalid config ({source}):\n  - {exc}") from None
    tree = cfg.model_dump(mode="json")
    folder = cfg.model.path
    if folder and "://" not in folder and not folder.startswith("builtin:") and (Path(folder).expanduser() / "model_index.json").is_file():
        from apexdistill.models.pipeline import pipeline_defaults  # reads model_index.json and the family's defaults

        explicit = {
            "model.backbone": "backbone" in cfg.model.model_fields_set,
            "text_encoder.kind": cfg.text_encoder.kind is not None,
            "vae.path": cfg.vae.path is not None,
            "data.channels": cfg.data.channels is not None,
        }
        try:
            updates = pipeline_defaults(cfg, explicit)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(str(exc)) from None
    else:
        updates = {
            "text_encoder.kind": cfg.text_encoder.kind or "minilm",
            "text_encoder.max_length": cfg.text_encoder.max_length or DEFAULT_TEXT_LENGTH,
            "teacher.guidance_scale": 1.0 if cfg.teacher.guidance_scale is None else cfg.teacher.guidance_scale,
            "objective.apex.guidance_ratio": cfg.objective.apex.guidance_ratio or 0.0,
        }
        if cfg.data.source == "teacher" and cfg.data.channels is None and not cfg.vae.path and (
                cfg.model.path.startswith("builtin:") or Path(cfg.model.path).expanduser().exists()):
            # (a folder that is not here, a cluster's path, is checked where the synthesis runs: TeacherSource)
            updates["data.channels"] = _teacher_pixel_channels(cfg.model.path, source)
    for key, value in updates.items():
        _set_dotted(tree, key, value)
    try:
        resolved = Config.model_validate(tree)
    except ValidationError as err:  # a combination the filled-in defaults make invalid (e.g. guidance without LoRA/EMA)
        raise ConfigError(_format_errors(err, f"{source} (with the defaults of model.path's pipeline)")) from None
    if resolved.data.buckets is not None:  # sizes the VAE and the patching allow, checked before any work
        from apexdistill.data.buckets import resolve_buckets

        try:
            resolve_buckets(resolved)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"invalid config ({source}): {exc}") from None
    return resolved


def _teacher_pixel_channels(path: str | None, source: str) -> int:
    """A pixel-space teacher that writes the data (data.source=teacher, no VAE): its images have the transformer's
    input channels (the shipped digits teacher's 1)."""
    import json

    from apexdistill.assets import resolve_model_path
    from apexdistill.models.build import resolve_transformer_folder

    try:
        folder = resolve_transformer_folder(resolve_model_path(path))
        return int(json.loads((Path(folder) / "config.json").read_text())["in_channels"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"invalid config ({source}):\n  - model.path: '{path}' is neither a stock pipeline folder (no "
                          f"model_index.json) nor a transformer folder with an in_channels in its config.json: data.source="
                          f"'teacher' cannot sample from it ({exc})") from None


def conditioning_record(cfg: Config) -> dict[str, Any]:
    """The conditioning a run trains with, resolved from its files: the family, the teacher's guidance (scale, ratio,
    the pipeline class whose CFG rule it is, its scheduler), the text encoder (kind, folder, identity and the prompt
    settings the pipeline encodes with) and the VAE (folder, identity). Written to the run folder
    (``conditioning.json``), to MLflow, and into every checkpoint's state; the export checks the folders still give it
    (read from config files only: no model is loaded)."""
    from apexdistill.models.family import read_model_index

    te = cfg.text_encoder
    text: dict[str, Any] = {"kind": te.kind, "path": te.path, "max_length": te.max_length}
    if te.kind == "pipeline":
        from apexdistill.models.text import pipeline_encoder_info

        info = pipeline_encoder_info(te)
        text.update(identity=info["identity"], settings=info["settings"], folder=str(Path(info["text_encoder"]).resolve()))
    vae = None
    if cfg.vae.path:
        from apexdistill.models.vae import read_vae_config

        folder, conf, cls = read_vae_config(cfg.vae.path)
        vae = {"folder": str(folder.resolve()), "identity": cls.config_identity(folder.name, conf)}
    index = read_model_index(cfg.model.path) if cfg.model.path and "://" not in cfg.model.path and not cfg.model.path.startswith(
        "builtin:") else None
    return {"family": cfg.model.backbone, "teacher": cfg.model.path, "guidance_scale": cfg.teacher.guidance_scale,
            "guidance_ratio": cfg.objective.apex.guidance_ratio, "pipeline_class": (index or {}).get("_class_name"),
            "teacher_scheduler": ((index or {}).get("scheduler") or [None, None])[1], "text_encoder": text, "vae": vae,
            "buckets": cfg.data.buckets}
