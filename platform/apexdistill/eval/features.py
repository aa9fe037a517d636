"""Feature spaces for scoring generated images, and the CLIP scorer: all from local paths, never a hub.

``latent`` needs no weights (the generator's own latents, pooled); ``clip`` and ``dinov2`` are
transformers folders (``CLIPModel`` / ``Dinov2Model`` with their processor) named in
``eval.feature_model``; the CLIP score uses a CLIP folder in ``eval.clip_model``. Every folder is
checked (exists, has a config of the right ``model_type``) before any image is generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

#: the most features a pooled latent keeps: FD needs many more images than feature dimensions
LATENT_MAX_DIM = 512
#: feature spaces ``eval.features`` accepts, and the transformers ``model_type`` each folder must have
FOLDER_MODEL_TYPES = {"clip": "clip", "dinov2": "dinov2"}


def check_model_folder(path: str | None, kind: str, field: str) -> Path:
    """``path`` is a local transformers folder of ``kind`` (clip, dinov2), else a ValueError naming ``field``."""
    if not path:
        raise ValueError(f"{field} is required for a {kind} model (a local transformers folder; nothing is downloaded)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{field}: no such folder {folder} (expected a local {kind} model saved with save_pretrained)")
    conf = folder / "config.json"
    if not conf.is_file():
        raise ValueError(f"{field}: {folder} has no config.json, so it is not a transformers {kind} model folder")
    try:
        model_type = json.loads(conf.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}: {conf} is not valid JSON: {exc}") from None
    if model_type != FOLDER_MODEL_TYPES[kind]:
        raise ValueError(f"{field}: {folder} is a '{model_type}' model, not a {kind} model (config.json model_type "
                         f"'{FOLDER_MODEL_TYPES[kind]}')")
    return folder


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) images in [-1, 1] -> uint8 (B, 3, H, W), as an image file would hold them (grey repeated)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def _embedding(out: Any) -> Tensor:
    """transformers 5 returns model outputs from ``get_*_features``: the projected embedding is ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


def pooled_latents(x: Tensor, max_dim: int = LATENT_MAX_DIM) -> Tensor:
    """(B, C, H, W) latents -> (B, C*g*g) float64: average-pooled onto the finest g x g grid (g in 8, 4, 2, 1)
    with at most ``max_dim`` features, so the covariance of a few hundred images is estimable."""
    c = x.shape[1]
    g = next(g for g in (8, 4, 2, 1) if c * g * g <= max_dim or g == 1)
    g = min(g, x.shape[-2], x.shape[-1])
    return torch.nn.functional.adaptive_avg_pool2d(x.float(), g).flatten(1).double().cpu()


class FeatureSpace:
    """Maps a batch of generated (latents, images) to (B, D) features."""

    name: ClassVar[str] = ""
    needs_images: ClassVar[bool] = True
    identity: str = ""

    def __call__(self, latents: Tensor | None, images: Tensor | None) -> Tensor:
        raise NotImplementedError


class LatentFeatures(FeatureSpace):
    """The generator's own latents (the pipeline's VAE space; pixels for pixel-space runs), pooled."""

    name = "latent"
    needs_images = False
    identity = f"latent-pool<= {LATENT_MAX_DIM}"

    def __call__(self, latents: Tensor | None, images: Tensor | None) -> Tensor:
        if latents is None:
            raise ValueError("latent features need the latents")
        return pooled_latents(latents)


class _TransformersImageModel(FeatureSpace):
    def __init__(self, folder: Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor

        self.folder, self.device = folder, torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(str(folder))
        self.identity = f"{self.name}:{folder.resolve()}"

    def pixel_values(self, images: Tensor) -> Tensor:
        return self.processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"].to(self.device)


class Dinov2Features(_TransformersImageModel):
    """DINOv2's CLS token after its processor's resize and ImageNet normalisation (Stein et al. 2023)."""

    name = "dinov2"

    def __init__(self, folder: Path, device: str | torch.device = "cpu") -> None:
        from transformers import Dinov2Model

        super().__init__(folder, device)
        self.model = Dinov2Model.from_pretrained(str(folder)).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, latents: Tensor | None, images: Tensor | None) -> Tensor:
        return self.model(pixel_values=self.pixel_values(images)).pooler_output.double().cpu()


class ClipModel(_TransformersImageModel):
    """A local CLIP folder: image embeddings as features, and the CLIP score (torchmetrics' definition:
    100 * cos(image embedding, text embedding), the set's score max(mean, 0))."""

    name = "clip"

    def __init__(self, folder: Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        super().__init__(folder, device)
        self.model = CLIPModel.from_pretrained(str(folder)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self._text_cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, latents: Tensor | None, images: Tensor | None) -> Tensor:
        return _embedding(self.model.get_image_features(pixel_values=self.pixel_values(images))).double().cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tok = self.tokenizer(missing, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
            emb = _embedding(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                          attention_mask=tok["attention_mask"].to(self.device)))
            self._text_cache.update(zip(missing, emb.float().cpu()))
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: list[str], image_features: Tensor | None = None) -> Tensor:
        """Per image 100 * cos(image, its prompt) (B,), float64 on the CPU."""
        img = image_features.float() if image_features is not None else self(None, images).float()
        txt = self.text_embeddings(prompts)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).double()


def clip_score_of(per_image: Tensor | list[float]) -> float:
    """A set's CLIP score from its per-image values, as torchmetrics' ``CLIPScore.compute``: max(mean, 0)."""
    values = torch.as_tensor(per_image, dtype=torch.float64)
    return float(values.mean().clamp_min(0.0))


def clip_truncated(folder: str, prompts: list[str]) -> int:
    """How many prompts are longer than the CLIP text encoder's window of ``folder`` (their tail is cut)."""
    from transformers import AutoTokenizer

    path = check_model_folder(folder, "clip", "eval.clip_model")
    window = int(json.loads((path / "config.json").read_text()).get("text_config", {}).get("max_position_embeddings", 77))
    ids = AutoTokenizer.from_pretrained(str(path))(list(prompts), truncation=False)["input_ids"]
    return sum(len(i) > window for i in ids)


def check_eval_models(eval_cfg: Any) -> None:
    """Every model folder the evaluation settings name is there and of the right kind: before any compute."""
    if eval_cfg.features in FOLDER_MODEL_TYPES:
        check_model_folder(eval_cfg.feature_model, eval_cfg.features, "eval.feature_model")
    if eval_cfg.clip_model:
        check_model_folder(eval_cfg.clip_model, "clip", "eval.clip_model")


def build_feature_space(eval_cfg: Any, device: str | torch.device = "cpu") -> FeatureSpace:
    kind = eval_cfg.features
    if kind == "latent":
        return LatentFeatures()
    folder = check_model_folder(eval_cfg.feature_model, kind, "eval.feature_model")
    return ClipModel(folder, device) if kind == "clip" else Dinov2Features(folder, device)


def build_clip_scorer(eval_cfg: Any, features: FeatureSpace | None = None, device: str | torch.device = "cpu") -> ClipModel | None:
    """The CLIP model of ``eval.clip_model`` (the feature model itself when it is that folder), or None."""
    if not eval_cfg.clip_model:
        return None
    folder = check_model_folder(eval_cfg.clip_model, "clip", "eval.clip_model")
    if isinstance(features, ClipModel) and features.folder.resolve() == folder.resolve():
        return features
    return ClipModel(folder, device)


# ----------------------------------------------------------------------------- tiny models for tests


def build_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A complete CLIP folder (model, tokenizer, processor) with random weights, built offline from the
    real transformers classes: it loads by path like a real one and tests the code path, never the numbers."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(letters)})
    vocab.update({ch + "</w>": i + 2 + len(letters) for i, ch in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: a word is its characters
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(folder))
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


def build_tiny_dinov2(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A DINOv2 folder (model and its BitImageProcessor, ImageNet normalisation) with random weights."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=image_size, patch_size=8)).save_pretrained(str(folder))
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(str(folder))
    return folder

