"""Where the flow lives: pixel space (no VAE, the default) or the latent space of a diffusers VAE
(AutoencoderKL, AutoencoderDC, AutoencoderKLQwenImage) loaded from a local folder. Both have ``encode(images in [-1, 1]) -> x`` and
``decode(x) -> images``, so data preprocessing and sampling never branch on which one it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apexdistill.config import VaeConfig


class PixelSpace(nn.Module):
    """No VAE: the model works on the pixels themselves."""

    def __init__(self, image_channels: int) -> None:
        super().__init__()
        self.image_channels = image_channels

    @property
    def channels(self) -> int:
        return self.image_channels

    @property
    def downsample(self) -> int:
        return 1

    @property
    def identity(self) -> str:
        return f"pixels:c{self.image_channels}"

    def latent_shape(self, resolution: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of a ``resolution`` square, or of ``resolution`` x ``width`` (height x width)."""
        return (self.channels, resolution, width or resolution)

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents


class Vae(nn.Module):
    """A frozen diffusers VAE behind one latent interface: ``encode(images in [-1, 1]) -> x`` in the
    normalized space the transformer sees, ``decode(x) -> images``. Subclasses (one per VAE class)
    say how a latent is normalized and how the downsampling factor is read from the config.

    What is cached is deterministic: the posterior mean for the KL VAEs (what Qwen-Image's image
    pipelines take with ``sample_mode="argmax"``; a sample would make the cache depend on a seed and
    add noise the flow does not need: the posterior std of these VAEs is tiny), and AutoencoderDC's
    latent, which has no posterior."""

    class_name: str = "AutoencoderKL"

    def __init__(self, autoencoder: nn.Module, source: str = "") -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.source = source

    # --- read from the config alone (the cache key is computed without loading any weights)

    @classmethod
    def config_channels(cls, conf: dict[str, Any]) -> int:
        return int(conf.get("latent_channels", 4))

    @classmethod
    def config_downsample(cls, conf: dict[str, Any]) -> int:
        return 2 ** (len(conf.get("block_out_channels", [64])) - 1)

    @classmethod
    def config_image_channels(cls, conf: dict[str, Any]) -> int:
        return int(conf.get("in_channels", 3))

    @classmethod
    def config_normalization(cls, conf: dict[str, Any]) -> str:
        scaling, shift = float(conf.get("scaling_factor", 0.18215)), float(conf.get("shift_factor") or 0.0)
        return f"s{scaling:g}:b{shift:g}"

    @classmethod
    def config_identity(cls, name: str, conf: dict[str, Any]) -> str:
        return f"{name}:{cls.class_name}:c{cls.config_channels(conf)}:f{cls.config_downsample(conf)}:{cls.config_normalization(conf)}"

    # --- properties of the loaded model

    @property
    def conf(self) -> dict[str, Any]:
        return dict(self.autoencoder.config)

    @property
    def image_channels(self) -> int:
        return self.config_image_channels(self.conf)

    @property
    def channels(self) -> int:
        return self.config_channels(self.conf)

    @property
    def downsample(self) -> int:
        return self.config_downsample(self.conf)

    @property
    def identity(self) -> str:
        """Stable identity for cache keys: folder name, class, latent channels, factor, normalization."""
        return self.config_identity(Path(self.source).name if self.source else "vae", self.conf)

    def latent_shape(self, resolution: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of a ``resolution`` square, or of ``resolution`` x ``width`` (height x width) pixels."""
        width = width or resolution
        if resolution % self.downsample or width % self.downsample:
            raise ValueError(f"image size {resolution}x{width} is not divisible by the VAE's downsampling factor {self.downsample}")
        return (self.channels, resolution // self.downsample, width // self.downsample)

    def _dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def _check(self, images: Tensor) -> None:
        if images.shape[1] != self.image_channels:
            raise ValueError(f"the VAE takes {self.image_channels}-channel images, got {images.shape[1]} channels")

    # --- the normalization (AutoencoderKL: shift and scale, as Z-Image, FLUX and SD3 pipelines do)

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.autoencoder.config.get("shift_factor") or 0.0)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        mean = self.autoencoder.encode(images.to(self._dtype())).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self._dtype()) / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z).sample.to(latents.dtype)


class DCVae(Vae):
    """Sana's AutoencoderDC: ``latent * scaling_factor`` (no shift, no posterior)."""

    class_name = "AutoencoderDC"

    @classmethod
    def config_channels(cls, conf: dict[str, Any]) -> int:
        return int(conf.get("latent_channels", 32))

    @classmethod
    def config_downsample(cls, conf: dict[str, Any]) -> int:
        return 2 ** (len(conf.get("encoder_block_out_channels", [1] * 6)) - 1)

    @classmethod
    def config_normalization(cls, conf: dict[str, Any]) -> str:
        return f"s{float(conf.get('scaling_factor', 1.0)):g}"

    @property
    def shift_factor(self) -> float:
        return 0.0

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        latent = self.autoencoder.encode(images.to(self._dtype())).latent
        return (latent * self.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents.to(self._dtype()) / self.scaling_factor).sample.to(latents.dtype)


class QwenVae(Vae):
    """Qwen-Image's AutoencoderKLQwenImage, a video VAE: images go in as one-frame videos
    (B, 3, 1, H, W); latents are normalized per channel, ``(mean - latents_mean) / latents_std``,
    as the Qwen-Image pipelines do; decoding inverts it and takes frame 0."""

    class_name = "AutoencoderKLQwenImage"

    @classmethod
    def config_channels(cls, conf: dict[str, Any]) -> int:
        return int(conf.get("z_dim", 16))

    @classmethod
    def config_downsample(cls, conf: dict[str, Any]) -> int:
        return 2 ** len(conf.get("temperal_downsample", [False, True, True]))

    @classmethod
    def config_image_channels(cls, conf: dict[str, Any]) -> int:
        return int(conf.get("input_channels", 3))

    @classmethod
    def config_normalization(cls, conf: dict[str, Any]) -> str:
        import hashlib

        stats = json.dumps([conf.get("latents_mean"), conf.get("latents_std")])
        return f"ms{hashlib.sha256(stats.encode()).hexdigest()[:8]}"

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = self.channels
        mean = torch.tensor(self.autoencoder.config.latents_mean, device=like.device, dtype=like.dtype).view(1, c, 1, 1)
        std = torch.tensor(self.autoencoder.config.latents_std, device=like.device, dtype=like.dtype).view(1, c, 1, 1)
        return mean, std

    @property
    def scaling_factor(self) -> float:
        return 1.0

    @property
    def shift_factor(self) -> float:
        return 0.0

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        latent = self.autoencoder.encode(images.to(self._dtype()).unsqueeze(2)).latent_dist.mean[:, :, 0]
        mean, std = self._stats(latent)
        return ((latent - mean) / std).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self._dtype())
        mean, std = self._stats(z)
        return self.autoencoder.decode((z * std + mean).unsqueeze(2)).sample[:, :, 0].to(latents.dtype)


VAE_CLASSES: dict[str, type[Vae]] = {cls.class_name: cls for cls in (Vae, DCVae, QwenVae)}


def vae_class(class_name: str, folder: str | Path = "") -> type[Vae]:
    try:
        return VAE_CLASSES[class_name]
    except KeyError:
        raise ValueError(f"vae.path: '{folder}' holds a {class_name}; supported VAEs: {sorted(VAE_CLASSES)}") from None


def tiny_vae_config(in_channels: int, latent_channels: int = 4) -> dict[str, Any]:
    """A small AutoencoderKL config (2x downsampling) for tests and CPU demos."""
    return dict(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    )


def resolve_vae_folder(path: str | Path) -> Path:
    from apexdistill.models.build import resolve_part_folder  # build imports this module

    return resolve_part_folder(path, "vae", "vae.path")


def read_vae_config(path: str | Path) -> tuple[Path, dict[str, Any], type[Vae]]:
    """(folder, config.json, adapter class) of a VAE folder or a pipeline folder's vae/."""
    folder = resolve_vae_folder(path)
    conf = json.loads((folder / "config.json").read_text())
    return folder, conf, vae_class(conf.get("_class_name", "AutoencoderKL"), folder)


def load_vae(path: str | Path) -> Vae:
    import diffusers

    folder, conf, cls = read_vae_config(path)
    model = getattr(diffusers, cls.class_name).from_pretrained(str(folder), local_files_only=True)
    return cls(model, source=str(folder))


def build_vae(cfg: VaeConfig, image_channels: int) -> Vae | PixelSpace:
    """Pixel space when ``vae.path`` is unset, else the VAE at that local folder (or pipeline folder)."""
    if not cfg.path:
        return PixelSpace(image_channels)
    vae = load_vae(cfg.path)
    if vae.image_channels != image_channels:
        raise ValueError(f"vae.path: the VAE at '{vae.source}' takes {vae.image_channels}-channel images, the data has {image_channels}")
    return vae
