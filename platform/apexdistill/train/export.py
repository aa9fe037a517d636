"""Turn a training checkpoint into a model: load it back into the backbone, or export a pipeline folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}


def export_pipeline(path: str | Path, out: str | Path, use_ema: bool = True, overwrite: bool = False, link: bool = False,
                    dtype: str | None = None) -> Path:
    """Export a run. Distilled from a stock pipeline (``model.path`` holds model_index.json): a
    complete stock pipeline folder that ``DiffusionPipeline.from_pretrained`` runs at 1-2 NFE
    (``save_stock_pipeline``), with the text encoder, tokenizer and VAE the run trained with and the exact call that
    encodes prompts as it did (``export_conditioning``, which refuses what the stock pipeline cannot reproduce); its
    transformer in ``dtype`` (default: the teacher transformer's stored dtype). Otherwise (the built-in digits):
    ``transformer/`` (LoRA merged) and, for a LoRA run, ``lora/`` with the adapter alone (loads back with
    ``load_lora``). Both get the resolved training config. The run's MLflow run (if any) gets the export path as a tag
    and the LoRA adapter as an artifact."""
    from apexdistill.models.family import read_model_index
    from apexdistill.models.lora import has_lora, save_lora
    from apexdistill.models.pipeline import save_stock_pipeline

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {sorted(set(DTYPES))}")
    cfg, ckpt = resolve_checkpoint(path)
    stock = bool(cfg.model.path) and read_model_index(cfg.model.path) is not None
    conditioning = export_conditioning(cfg) if stock else None  # refused before any weight is loaded
    if stock:
        check_conditioning_unchanged(cfg, ckpt)
    backbone, cfg = load_trained_backbone(path, use_ema)
    meta = {"ema": use_ema, "objective": cfg.objective.name, "guidance_ratio": cfg.objective.apex.guidance_ratio,
            "teacher_guidance_scale": cfg.teacher.guidance_scale, "steps": _trained_steps(path)}
    if stock:
        import torch

        stored = DTYPES[dtype] if dtype else teacher_dtype(cfg.model.path)
        meta.update(conditioning=conditioning["record"], components_from=conditioning["source"])
        folder = save_stock_pipeline(out, backbone, cfg.model.path, link=link, overwrite=overwrite, meta=meta,
                                     components=conditioning["components"], call=conditioning["call"],
                                     dtype=getattr(torch, stored))
    else:
        if link:
            raise ValueError("--link links the teacher pipeline's VAE, text encoder and tokenizer: this run has no pipeline folder (model.path)")
        folder = Path(save_pipeline(out, backbone, extra_meta=meta, overwrite=overwrite))
        if has_lora(backbone):
            save_lora(backbone, folder / LORA_DIR)
    dump_yaml(cfg, folder / "train_config.yaml")
    _record_export(local_run(path), folder)
    return folder


def export_conditioning(cfg: Config) -> dict:
    """What the exported stock pipeline must hold and be called with to condition the student as the run trained it:
    ``components`` (text_encoder, tokenizer, vae folders), ``call`` (the ``pipe(...)`` arguments: guidance off, the
    prompt settings), ``record`` (for apexdistill.json). Raises, naming the config field, where the stock pipeline
    cannot reproduce it: a text encoder that is not its own kind (MiniLM, a transformers folder), another family's
    encoder, a component of another class than the pipeline loads."""
    import json

    from apexdistill.models.family import family_of_pipeline, read_model_index
    from apexdistill.models.text import _settings, pipeline_encoder_folders
    from apexdistill.models.vae import read_vae_config

    teacher = Path(cfg.model.path)
    family = family_of_pipeline(teacher)
    index = read_model_index(teacher) or {}
    te = cfg.text_encoder
    if te.kind != "pipeline":
        raise ValueError(f"text_encoder.kind='{te.kind}': this run trained on the text states of "
                         f"{te.path or 'the built-in MiniLM'}, but the stock {family.pipeline_class} encodes prompts with its "
                         f"own text encoder ({index.get('text_encoder', ['', '?'])[1]}); exported, the student would run on states "
                         "it never trained on. Export needs text_encoder.kind=pipeline (the pipeline's own encoder, or another "
                         f"{family.pipeline_class}'s)")
    pipeline, encoder, tokenizer = pipeline_encoder_folders(te.path or teacher)
    if family_of_pipeline(pipeline).name != family.name:
        raise ValueError(f"text_encoder.path='{te.path}' is a {family_of_pipeline(pipeline).pipeline_class}'s encoder; the exported "
                         f"{family.pipeline_class} would encode prompts differently")
    want = index.get("text_encoder", [None, None])[1]
    got = json.loads((encoder / "config.json").read_text()).get("model_type")
    import transformers

    want_type = getattr(getattr(getattr(transformers, want or "", None), "config_class", None), "model_type", None)
    if want_type and got and got != want_type:  # the class model_index.json loads reads this config: same model type
        raise ValueError(f"text_encoder.path: the encoder at '{encoder}' is a '{got}' model, but {family.pipeline_class} loads a "
                         f"{want} ('{want_type}'): the stock pipeline cannot run it")
    vae_folder, vae_conf, _ = read_vae_config(cfg.vae.path or teacher)
    want_vae = index.get("vae", [None, None])[1]
    if want_vae and vae_conf.get("_class_name") != want_vae:
        raise ValueError(f"vae.path: the VAE at '{vae_folder}' is a {vae_conf.get('_class_name')}, but {family.pipeline_class} "
                         f"loads a {want_vae}: the stock pipeline cannot run it")
    settings = _settings(te, family)
    call = {family.guidance_argument: family.guidance_off, **family.exact_call_kwargs, **family.call_kwargs(settings)}
    own = pipeline.resolve() == teacher.resolve() and vae_folder.resolve() == (teacher / "vae").resolve()
    record = {"text_encoder": str(encoder.resolve()), "tokenizer": str(tokenizer.resolve()), "vae": str(vae_folder.resolve()),
              "max_sequence_length": settings.max_sequence_length, "negative_prompt": settings.negative_prompt,
              "complex_human_instruction": settings.complex_human_instruction}
    return {"components": {"text_encoder": encoder, "tokenizer": tokenizer, "vae": vae_folder}, "call": call,
            "record": record, "source": "the teacher's" if own else f"text encoder {encoder}, VAE {vae_folder}"}


def check_conditioning_unchanged(cfg: Config, ckpt: Path) -> None:
    """The folders the export ships must still give the conditioning the checkpoint recorded when it was trained
    (a teacher folder whose encoder or VAE was replaced since would ship other components than the student knows)."""
    import json

    from apexdistill.resolve import conditioning_record

    recorded = json.loads((ckpt / CHECKPOINT_STATE).read_text()).get("conditioning")
    if not recorded:  # a checkpoint from before the record existed
        return
    now = json.loads(json.dumps(conditioning_record(cfg)))

    def changed(a: Any, b: Any, key: str = "") -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [c for k in sorted(set(a) | set(b)) for c in changed(a.get(k), b.get(k), f"{key}.{k}" if key else k)]
        return [] if a == b else [f"{key}: trained with {a!r}, now {b!r}"]

    diff = changed(recorded, now)
    if diff:
        raise ValueError(f"export: the folders this run names no longer give the conditioning it trained with ({'; '.join(diff)}); "
                         "exported, the student would be run on other components: restore them, or train again")


def teacher_dtype(folder: str | Path) -> str:
    """The dtype the teacher pipeline's transformer weights are stored in (its first safetensors tensor)."""
    import json
    import struct

    files = sorted((Path(folder) / "transformer").glob("*.safetensors"))
    # the weights from_pretrained loads: diffusion_pytorch_model(-0000x-of-...).safetensors, not a .fp16/.bf16 variant
    plain = [f for f in files if not any(f".{v}." in f.name for v in ("fp16", "bf16", "fp32"))]
    files = plain or files
    if not files:
        return "float32"
    with files[0].open("rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    stored = next((v["dtype"] for k, v in header.items() if k != "__metadata__"), "F32")
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored, "float32")


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
