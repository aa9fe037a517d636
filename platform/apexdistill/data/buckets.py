"""Aspect-ratio buckets: the (height, width) shapes that images are resized and cropped to.

``data.buckets`` is a list of ``[height, width]`` in pixels, or a named set:

- ``sana``: the aspect-ratio bins Sana's (and PixArt's) pipelines snap sizes to, diffusers'
  ``ASPECT_RATIO_<N>_BIN`` tables. At ``data.resolution`` 256, 512, 1024, 2048 or 4096 the table of
  that size is used as is (what ``SanaPipeline(use_resolution_binning=True)`` uses for a model of
  that size); at any other resolution the 1024 table is scaled by ``resolution / 1024``. Each side is
  then rounded to the nearest multiple of the size step (below), and bins that round to the same
  shape are kept once. So the square bin is always ``data.resolution`` x ``data.resolution``.

Every bucket side must be a multiple of the step ``VAE downsampling factor x transformer patch
size`` (1 x patch in pixel space); an explicit list is checked, never rounded. Each image goes to the
bucket nearest to it in log aspect ratio (portrait and landscape alike; ties go to the first), is
resized so it covers the bucket (bicubic) and centre-cropped to it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from apexdistill.config import Config

#: the named sets and what they are
NAMED_BUCKETS = {"sana": "Sana's / PixArt's aspect-ratio bins (diffusers ASPECT_RATIO_<N>_BIN), scaled to data.resolution"}

_SANA_TABLES = {
    256: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_256_BIN"),
    512: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_512_BIN"),
    1024: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_1024_BIN"),
    2048: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma", "ASPECT_RATIO_2048_BIN"),
    4096: ("diffusers.pipelines.sana.pipeline_sana", "ASPECT_RATIO_4096_BIN"),
}

Bucket = tuple[int, int]  # (height, width) in pixels


@functools.lru_cache(maxsize=None)
def _table(resolution: int) -> tuple[Bucket, ...]:
    import importlib

    module, name = _SANA_TABLES[resolution]
    table = getattr(importlib.import_module(module), name)
    return tuple((int(h), int(w)) for h, w in table.values())


def sana_buckets(resolution: int, step: int) -> list[Bucket]:
    """The ``sana`` named set at ``resolution`` with sides rounded to multiples of ``step``."""
    if resolution in _SANA_TABLES:
        raw: list[tuple[float, float]] = list(_table(resolution))
    else:
        scale = resolution / 1024
        raw = [(h * scale, w * scale) for h, w in _table(1024)]
    out: list[Bucket] = []
    for h, w in raw:
        shape = (max(step, step * round(h / step)), max(step, step * round(w / step)))
        if shape not in out:
            out.append(shape)
    return out


def size_step(cfg: Config) -> tuple[int, str]:
    """(step, how it is made up): bucket sides must be multiples of the VAE factor x the patch size."""
    import json

    from apexdistill.models.family import get_family

    factor = 1
    if cfg.vae.path:
        from apexdistill.models.vae import read_vae_config

        _, conf, cls = read_vae_config(cfg.vae.path)
        factor = cls.config_downsample(conf)
    family = get_family(cfg.model.backbone)
    if cfg.model.path:
        from apexdistill.assets import resolve_model_path
        from apexdistill.models.build import resolve_transformer_folder

        folder = resolve_transformer_folder(resolve_model_path(cfg.model.path))
        patch = family.patch_size(json.loads((folder / "config.json").read_text()))
    else:
        latent = max(1, cfg.data.resolution // factor)
        patch = family.patch_size(family.preset_config(cfg.model.preset, cfg.data.image_channels, latent, 384, cfg.model.target_time))
    return factor * patch, f"the VAE factor {factor} x the transformer's patch size {patch}"


def resolve_buckets(cfg: Config) -> list[Bucket] | None:
    """The configured buckets in pixels (None: the square ``data.resolution``), checked against the
    size step; the error names ``data.buckets`` and the first bucket that does not fit."""
    spec = cfg.data.buckets
    if spec is None:
        return None
    step, why = size_step(cfg)
    if isinstance(spec, str):
        return sana_buckets(cfg.data.resolution, step)
    buckets = [(int(h), int(w)) for h, w in spec]
    for i, (h, w) in enumerate(buckets):
        if h % step or w % step:
            raise ValueError(f"data.buckets[{i}] = [{h}, {w}]: height and width must be multiples of {step} ({why}); "
                             f"for example [{max(step, step * round(h / step))}, {max(step, step * round(w / step))}]")
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``height / width`` in log scale."""
    ratio = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


def bucket_table(buckets: list[Bucket], x_shapes: list[list[int]], rows: list[int] | None = None) -> list[dict[str, Any]]:
    """What the cache manifest records per bucket: pixel size, cached ``x`` shape and row count."""
    return [{"height": h, "width": w, "x_shape": list(s), **({"rows": int(rows[i])} if rows is not None else {})}
            for i, ((h, w), s) in enumerate(zip(buckets, x_shapes))]
