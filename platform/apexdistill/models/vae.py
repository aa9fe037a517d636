"""Where the flow lives: pixel space (no VAE, the default) or the latent space of a diffusers
AutoencoderKL loaded from a local folder. Both have ``encode(images in [-1, 1]) -> x`` and
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

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.channels, resolution, resolution)

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents


class Vae(nn.Module):
    """A frozen AutoencoderKL. ``encode`` uses the posterior mean (deterministic, so cached latents
    do not depend on a seed) and applies the config's shift and scaling factor:
    ``x = (mean - shift_factor) * scaling_factor``; ``decode`` inverts it."""

    def __init__(self, autoencoder: nn.Module, source: str = "") -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.source = source
        cfg = autoencoder.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor or 0.0)

    @property
    def image_channels(self) -> int:
        return int(self.autoencoder.config.in_channels)

    @property
    def channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def identity(self) -> str:
        """Stable identity for cache keys: folder name, latent channels, scaling."""
        name = Path(self.source).name if self.source else "vae"
        return f"{name}:c{self.channels}:f{self.downsample}:s{self.scaling_factor:g}:b{self.shift_factor:g}"

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise ValueError(f"data.resolution={resolution} is not divisible by the VAE's downsampling factor {self.downsample}")
        return (self.channels, resolution // self.downsample, resolution // self.downsample)

    def _dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        if images.shape[1] != self.image_channels:
            raise ValueError(f"the VAE takes {self.image_channels}-channel images, got {images.shape[1]} channels")
        mean = self.autoencoder.encode(images.to(self._dtype())).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self._dtype()) / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z).sample.to(latents.dtype)


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


def load_vae(path: str | Path) -> Vae:
    from diffusers import AutoencoderKL

    folder = resolve_vae_folder(path)
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"vae.path: '{folder}' holds a {class_name}; only AutoencoderKL is supported")
    return Vae(AutoencoderKL.from_pretrained(str(folder), local_files_only=True), source=str(folder))


def build_vae(cfg: VaeConfig, image_channels: int) -> Vae | PixelSpace:
    """Pixel space when ``vae.path`` is unset, else the AutoencoderKL at that local folder."""
    if not cfg.path:
        return PixelSpace(image_channels)
    vae = load_vae(cfg.path)
    if vae.image_channels != image_channels:
        raise ValueError(f"vae.path: the VAE at '{vae.source}' takes {vae.image_channels}-channel images, the data has {image_channels}")
    return vae
