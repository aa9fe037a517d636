"""Training rows for the worker loop: images (or latents) plus text states per row.

For the built-in digits the ten captions are encoded once and rows index into that table, so a batch
costs no text-encoder work. (The Ray Data Parquet cache replaces this for real datasets.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from apexdistill.config import Config
from apexdistill.data.digits import CAPTIONS, load_digits_split


@dataclass
class TrainData:
    x: Tensor  # (N, C, R, R)
    cond_index: Tensor  # (N,) row -> index into the text table
    text_table: Tensor  # (K, L, D)
    mask_table: Tensor  # (K, L)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.x.shape[-1])

    @property
    def text_dim(self) -> int:
        return int(self.text_table.shape[-1])

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        k = self.cond_index[idx]
        return {"x": self.x[idx], "text": self.text_table[k], "text_mask": self.mask_table[k], "label": k}


def encode_captions(cfg: Config, captions: list[str]) -> tuple[Tensor, Tensor]:
    from apexdistill.models.text import TextEncoder

    encoder = TextEncoder(cfg.text_encoder.path if cfg.text_encoder.kind == "transformers" else None, cfg.text_encoder.max_length)
    return encoder.encode(captions)


def load_train_data(cfg: Config) -> TrainData:
    split = load_digits_split("train", cfg.data.resolution, cfg.data.test_fraction, cfg.data.split_seed)
    text, mask = encode_captions(cfg, CAPTIONS)
    return TrainData(split.images, split.labels, text, mask)
