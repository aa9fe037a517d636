"""The built-in real dataset: scikit-learn's 1,797 handwritten digits (8x8, 10 classes).

Images are scaled to [-1, 1] and upscaled bilinearly to the configured resolution; each gets the
caption "a handwritten digit <word>". The split is fixed by ``split_seed`` (stratified), so every
run, the evaluator and the teacher see the same train and test rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def caption_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


CAPTIONS = [caption_for(i) for i in range(10)]


@dataclass
class DigitsSplit:
    images: torch.Tensor  # (N, 1, R, R) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    captions: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def upscale(images_8x8: np.ndarray, resolution: int) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> (N, 1, R, R) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(images_8x8, dtype=np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous()


def load_digits_split(split: str, resolution: int = 16, test_fraction: float = 0.2, split_seed: int = 0) -> DigitsSplit:
    """``split`` is "train" or "test"."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=split_seed, stratify=digits.target)
    rows = np.sort(train_idx if split == "train" else test_idx)
    labels = torch.from_numpy(digits.target[rows].astype(np.int64))
    return DigitsSplit(upscale(digits.images[rows], resolution), labels, [caption_for(int(l)) for l in labels])
