"""The digit classifier behind the quality metrics: a small CNN trained on the real train split.

Its 64-d penultimate features feed the Frechet distance (FD) proxy, and its logits say whether a
generated image shows the digit it was prompted with. The default split's classifier ships with the
package (``assets/evaluator``), so every machine scores with the same network; other keys are trained
on first use and cached as safetensors next to a JSON with the training info, keyed by everything
that changes them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from apexdistill.data.digits import load_digits_split

# Bump when the architecture or the training recipe changes: old caches are then ignored, not misread.
CLASSIFIER_VERSION = 1
# The network always sees WORK_SIZE x WORK_SIZE inputs. The built-in digits carry 8x8 worth of
# information, so 16x16 loses nothing of the real data and keeps the cost (and the feature scale)
# the same at every resolution.
WORK_SIZE = 16
FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitClassifier(nn.Module):
    """(B, 1, R, R) images in [-1, 1] -> logits (B, 10); ``features`` gives the 64-d penultimate layer."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.work_size = WORK_SIZE
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.embed = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @torch.jit.export
    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError("DigitClassifier expects (B, 1, R, R) images, got shape " + str(x.shape))
        size = self.work_size
        if x.shape[-2] != size or x.shape[-1] != size:
            downscale = x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=downscale)
        h = self.body(x)
        return F.relu(self.embed(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.jit.export
    def logits(self, x: Tensor) -> Tensor:
        return self.forward(x)


# ----------------------------------------------------------------------------- training


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Light, label-preserving jitter (small rotation, scale, shift, pixel noise) so the classifier
    also recognises the slightly off-centre, blurry or noisy digits a generator produces."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (10.0 * torch.pi / 180.0)
    scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    # Shifts of up to 1.5 pixels at the image's own resolution (normalised coordinates span 2).
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1.5 * 2.0 / x.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x + 1 with zero padding so pixels moved in from outside are background (-1), not grey.
    out = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    noise_std = torch.rand(n, 1, 1, 1, generator=generator) * 0.1
    out = out + noise_std * torch.randn(out.shape, generator=generator)
    return out.clamp(-1.0, 1.0)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size].to(logits.device)).sum())
    return correct / max(int(images.shape[0]), 1)


def train_classifier(
    resolution: int = 16,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_threads: int | None = 1,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train on the real train split (CPU, fixed seeds) and measure accuracy on the real test split.

    ``num_threads`` (restored afterwards): the network is tiny, so one thread is about as fast as
    two, and it does not collapse when other processes share the cores (measured: 0.024 s per step
    on one thread, 0.73 s on two while another process kept one core busy). None keeps torch's setting.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(resolution, test_fraction, split_seed, seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    resolution: int, test_fraction: float, split_seed: int, seed: int, epochs: int, batch_size: int, lr: float
) -> tuple[DigitClassifier, dict[str, Any]]:
    train = load_digits_split("train", resolution, test_fraction, split_seed)
    test = load_digits_split("test", resolution, test_fraction, split_seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = _augment(train.images[idx], gen)
            loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    info = {
        "version": CLASSIFIER_VERSION,
        "resolution": resolution,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "seed": seed,
        "epochs": epochs,
        "n_train": len(train),
        "n_test": len(test),
        "train_accuracy": classifier_accuracy(model, train.images, train.labels),
        "test_accuracy": classifier_accuracy(model, test.images, test.labels),
        "train_seconds": round(train_seconds, 2),
    }
    return model, info


# ----------------------------------------------------------------------------- cache


def cache_key(resolution: int, test_fraction: float, split_seed: int, seed: int) -> str:
    return f"digit_classifier_v{CLASSIFIER_VERSION}_r{resolution}_tf{test_fraction:g}_split{split_seed}_seed{seed}"


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_entry(weights_path: Path, info_path: Path) -> tuple[DigitClassifier, dict[str, Any]]:
    info = json.loads(info_path.read_text())
    model = DigitClassifier()
    model.load_state_dict(load_file(str(weights_path)))
    model.eval()
    info.update(weights_path=str(weights_path), info_path=str(info_path))
    return model, info


def load_or_train_classifier(
    cache_dir: str | Path,
    resolution: int = 16,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    seed: int = 0,
    shipped: bool = True,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """The classifier for this resolution / split / seed: the one shipped with the package when there
    is one for that key (``shipped``; the default split is), else the cached one, trained (and cached
    in ``cache_dir``) on first use. The shipped one makes the FD proxy the same function on every
    machine: trained here, CPU-dependent float round-off changes the features a little.

    The info dict carries ``test_accuracy``, ``train_seconds``, the paths, ``from_cache`` and ``shipped``.
    """
    if not 8 <= int(resolution) <= 1024:
        raise ValueError(f"resolution must be between 8 and 1024 pixels, got {resolution}")
    key = cache_key(resolution, test_fraction, split_seed, seed)
    if shipped:
        from apexdistill.assets import EVALUATOR, EVALUATOR_COMMAND

        weights_path, info_path = EVALUATOR / f"{key}.safetensors", EVALUATOR / f"{key}.json"
        if weights_path.is_file() or info_path.is_file():
            try:
                model, info = _load_entry(weights_path, info_path)
            except Exception as exc:  # a damaged install must not silently score with another network
                raise RuntimeError(f"the shipped evaluator classifier {weights_path} is unreadable ({exc}); "
                                   f"reinstall the package or regenerate it with: {EVALUATOR_COMMAND}") from exc
            info.update(from_cache=True, shipped=True)
            return model, info
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    weights_path, info_path = cache / f"{key}.safetensors", cache / f"{key}.json"

    if weights_path.is_file() and info_path.is_file():
        try:
            model, info = _load_entry(weights_path, info_path)
        except Exception as exc:  # a damaged cache is rebuilt, but say so
            import warnings

            warnings.warn(f"ignoring unreadable classifier cache {weights_path}: {exc}; retraining", stacklevel=2)
        else:
            info.update(from_cache=True, shipped=False)
            return model, info

    model, info = train_classifier(resolution, test_fraction, split_seed, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # Weights first, JSON second: the JSON is the marker that a complete entry exists.
    _atomic_write(weights_path, lambda p: save_file(state, p, metadata={"cache_key": key}))
    _atomic_write(info_path, lambda p: Path(p).write_text(json.dumps(info, indent=2)))
    info.update(from_cache=False, shipped=False, weights_path=str(weights_path), info_path=str(info_path))
    return model, info

