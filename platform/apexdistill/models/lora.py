"""LoRA on a backbone's diffusers transformer, through peft (diffusers' ``PeftAdapterMixin``).

``apply_lora`` injects adapters into the modules whose names end with one of ``cfg.targets`` and
freezes everything else, except the target-time embedding (a pretrained model has never seen a
target time, so it must learn it). ``save_lora`` / ``load_lora`` use diffusers' own adapter files
(``pytorch_lora_weights.safetensors``, with the peft config in the safetensors metadata) plus
``target_time.safetensors`` when the backbone has a target-time embedding. ``merge_lora`` folds the
adapters into the base weights for export.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from apexdistill.config import LoraConfig
from apexdistill.models.backbone import TARGET_TIME_WEIGHTS, Backbone, load_target_time

ADAPTER_NAME = "default"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
# module types peft's LoRA can wrap
_LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def has_lora(backbone: Backbone) -> bool:
    return bool(getattr(backbone.transformer, "peft_config", None))


def _matches(name: str, suffix: str) -> bool:
    # peft's rule for a list of target_modules: the full name, or a dotted suffix of it
    return name == suffix or name.endswith("." + suffix)


def lora_targets(backbone: Backbone, targets: list[str]) -> list[str]:
    """Check ``targets`` against the transformer's modules; an empty list means the family's defaults.
    Raises ``ValueError`` naming the targets that match nothing and listing available names."""
    targets = list(targets) or list(backbone.default_lora_targets)
    names = [n for n, m in backbone.transformer.named_modules() if isinstance(m, _LORA_TYPES)]
    unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unmatched:
        linear = [n for n, m in backbone.transformer.named_modules() if isinstance(m, nn.Linear)]
        # show one block's worth of names with the block index stripped, then the rest
        short = sorted({n.split(".", 2)[-1] if n.startswith("transformer_blocks.") else n for n in linear})
        raise ValueError(
            f"model.lora.targets: {unmatched} match no Linear/Conv module of the {backbone.family} transformer "
            f"(targets are module-name suffixes). Available Linear modules include: {short[:40]}"
        )
    return targets


def freeze_for_lora(backbone: Backbone) -> None:
    """Only LoRA weights and the target-time embedding train."""
    backbone.requires_grad_(False)
    for name, param in backbone.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
    for module in backbone.target_time_modules().values():
        module.requires_grad_(True)


def apply_lora(backbone: Backbone, cfg: LoraConfig) -> Backbone:
    """Inject LoRA adapters (in place) and freeze the base weights; returns ``backbone``."""
    from peft import LoraConfig as PeftLoraConfig

    if has_lora(backbone):
        raise ValueError("apply_lora: this backbone already has a LoRA adapter")
    targets = lora_targets(backbone, cfg.targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights=True,  # B = 0: the adapted model starts exactly at the base model
    )
    backbone.transformer.add_adapter(peft_cfg, adapter_name=ADAPTER_NAME)
    freeze_for_lora(backbone)
    return backbone


def lora_summary(backbone: Backbone) -> str:
    trainable, total = count_parameters(backbone)
    return f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.3f}M parameters ({100 * trainable / max(total, 1):.2f}%)"


def _target_time_state(backbone: Backbone) -> dict:
    state = {}
    for prefix, module in backbone.target_time_modules().items():
        for key, value in module.state_dict().items():
            state[f"{prefix}.{key}"] = value.detach().contiguous()
    return state


def save_lora(backbone: Backbone, folder: str | Path) -> Path:
    """Write the adapter (diffusers format) and, with a target time, its embedding; returns the folder."""
    if not has_lora(backbone):
        raise ValueError("save_lora: this backbone has no LoRA adapter (model.lora.enabled=false?)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet("diffusers.models.modeling_utils"):
        # save_lora_adapter calls self.to(dtype=None), which makes diffusers warn about fp32 modules
        backbone.transformer.save_lora_adapter(str(folder), adapter_name=ADAPTER_NAME, safe_serialization=True)
    extra = _target_time_state(backbone)
    if extra:
        save_file(extra, str(folder / TARGET_TIME_WEIGHTS))
    return folder


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_lora(backbone: Backbone, folder: str | Path) -> Backbone:
    """Load an adapter written by ``save_lora``. A backbone without an adapter gets one with the saved
    peft config; one that already has an adapter (``apply_lora``) has its weights replaced."""
    folder = Path(folder)
    weights = folder / LORA_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no LoRA adapter at '{folder}' (expected {LORA_WEIGHTS})")
    if has_lora(backbone):
        from peft import set_peft_model_state_dict

        state = load_file(str(weights))
        result = set_peft_model_state_dict(backbone.transformer, state, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{weights}: LoRA weights {unexpected[:5]} do not match this backbone's adapter "
                             f"(different model.lora.targets?)")
    else:
        # diffusers finds files written by save_lora_adapter only with these two arguments
        backbone.transformer.load_lora_adapter(str(folder), adapter_name=ADAPTER_NAME, prefix=None, use_safetensors=True)
    if (folder / TARGET_TIME_WEIGHTS).is_file():
        load_target_time(backbone, folder / TARGET_TIME_WEIGHTS)
    freeze_for_lora(backbone)
    return backbone


def merge_lora(backbone: Backbone) -> Backbone:
    """Fold the adapters into the base weights and remove the LoRA layers (in place), for export."""
    if has_lora(backbone):
        backbone.transformer.fuse_lora(adapter_names=[ADAPTER_NAME])
        backbone.transformer.unload_lora()
    return backbone
