"""Z-Image (``ZImagePipeline``): a Qwen3 text encoder, ``AutoencoderKL`` (16 channels, shift and
scale), ``ZImageTransformer2DModel`` (single-stream DiT; model time ``1 - sigma``, raw output
``x0 - noise``), FlowMatchEuler with a shift, CFG ``pos + g*(pos - neg)``.
"""

from __future__ import annotations

from apexdistill.models.family import Family, register_family


@register_family
class ZImage(Family):
    name = "zimage"
    pipeline_class = "ZImagePipeline"
    transformer_class = "ZImageTransformer2DModel"
