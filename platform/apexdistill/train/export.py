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
from apexdistill.train.strategy import EMA_FILE, MODEL_FILE

LORA_DIR = "lora"  # the adapter alone, next to the merged transformer/


_FETCHED: dict[str, Path] = {}  # run URI -> its local copy, fetched once per process


def local_run(path: str | Path) -> Path:
    """A local path as is; a run URI on ``run.storage_uri`` (``<uri>/runs/<name>`` or one of its
    ``checkpoints/step_*``) downloaded once into a temp folder laid out as a run folder (weights,
    config and shapes; not the sharded training state), removed when the process exits."""
    from apexdistill.train.storage import fetch_run, is_uri

    if not is_uri(path):
        return Path(path)
    uri = str(path).rstrip("/")
    if uri not in _FETCHED:
        import atexit
        import shutil

        local = fetch_run(uri)  # endpoint and credentials from the environment (AWS_ENDPOINT_URL, ...)
        atexit.register(shutil.rmtree, local, True)
        step = uri.rsplit("/", 1)[-1]
        _FETCHED[uri] = local / "checkpoints" / step if step.startswith("step_") else local
    return _FETCHED[uri]


def resolve_checkpoint(path: str | Path) -> tuple[Config, Path]:
    """A run folder (``<workdir>/runs/<name>``) or one of its ``checkpoints/step_*`` folders, local
    or on ``run.storage_uri`` (``s3://.../runs/<name>``: the latest complete checkpoint is fetched)."""
    p = local_run(path)
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
    weights = ckpt / (EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else MODEL_FILE)
    if not weights.is_file():
        raise FileNotFoundError(
            f"checkpoint '{ckpt}' holds only the sharded training state (train.strategy={cfg.train.strategy}); "
            f"full weights are written with the run's final checkpoint: pass the run folder or its last step_* folder"
        )
    backbone.load_state_dict(load_file(str(weights)))
    return backbone.eval(), cfg


def export_pipeline(path: str | Path, out: str | Path, use_ema: bool = True, overwrite: bool = False, link: bool = False) -> Path:
    """Export a run. Distilled from a stock pipeline (``model.path`` holds model_index.json): a
    complete stock pipeline folder that ``DiffusionPipeline.from_pretrained`` runs at 1-2 NFE
    (``save_stock_pipeline``). Otherwise (the built-in digits): ``transformer/`` (LoRA merged) and, for
    a LoRA run, ``lora/`` with the adapter alone (loads back with ``load_lora``). Both get the
    resolved training config. The run's MLflow run (if any) gets the export path as a tag and the
    LoRA adapter as an artifact."""
    from apexdistill.models.family import read_model_index
    from apexdistill.models.lora import has_lora, save_lora
    from apexdistill.models.pipeline import save_stock_pipeline

    backbone, cfg = load_trained_backbone(path, use_ema)
    meta = {"ema": use_ema, "objective": cfg.objective.name, "guidance_ratio": cfg.objective.apex.guidance_ratio,
            "steps": _trained_steps(path)}
    if cfg.model.path and read_model_index(cfg.model.path) is not None:
        folder = save_stock_pipeline(out, backbone, cfg.model.path, link=link, overwrite=overwrite, meta=meta)
    else:
        if link:
            raise ValueError("--link links the teacher pipeline's VAE, text encoder and tokenizer: this run has no pipeline folder (model.path)")
        folder = Path(save_pipeline(out, backbone, extra_meta=meta, overwrite=overwrite))
        if has_lora(backbone):
            save_lora(backbone, folder / LORA_DIR)
    dump_yaml(cfg, folder / "train_config.yaml")
    _record_export(local_run(path), folder)
    return folder


def _trained_steps(path: str | Path) -> int | None:
    import json

    _, ckpt = resolve_checkpoint(path)
    return json.loads((ckpt / CHECKPOINT_STATE).read_text()).get("step")


def _record_export(path: Path, folder: Path) -> None:
    import json

    from apexdistill.tracking import RUN_FILE, RunLogger

    run_folder = path if (path / RUN_FILE).is_file() else path.parent.parent
    record = run_folder / RUN_FILE
    if not record.is_file():
        return
    data = json.loads(record.read_text())
    try:
        logger = RunLogger(data["uri"], data["run_id"])
        logger.set_tags({"apexdistill.export": str(folder.resolve())})
        if (folder / LORA_DIR).is_dir():
            logger.log_artifacts(folder / LORA_DIR, LORA_DIR)
    except Exception as exc:  # noqa: BLE001 - the export itself succeeded; say why it is not tracked
        print(f"[export] note: could not record the export in MLflow run {data.get('run_id')}: {exc}")
