"""Quality metrics: Frechet distance (FD) on a feature network, and prompt accuracy.

FD here is the FID formula on the features of a pluggable network: by default the 64-d penultimate
layer of the digit classifier (an "FD proxy", not comparable to Inception FID numbers), or any local
TorchScript / torch.export module a user supplies (for example an Inception network they have).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from apexdistill.data.digits import load_digits_split


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps (B, C, R, R) images in [-1, 1] to (B, D) features."""

    def features(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class DigitClassifierLike(FeatureExtractor, Protocol):
    """A feature extractor that also gives (B, 10) digit logits, so prompt accuracy can be scored."""

    def logits(self, x: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------- Frechet distance


def _as_float64(feats: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = feats.detach().cpu().double().numpy() if isinstance(feats, Tensor) else np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((sym + sym.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the FD between two Gaussians.

    tr (S_a S_b)^(1/2) is computed as tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): the matrix inside is symmetric
    positive semi-definite, so symmetric eigendecompositions give it without the complex round-off
    (tiny imaginary parts) that a general ``sqrtm`` of the non-symmetric product produces.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(
            f"feature dimensions differ: mean {mu_a.shape} vs {mu_b.shape}, covariance {sigma_a.shape} vs {sigma_b.shape}"
        )
    root_a = _psd_sqrt(sigma_a)
    inner = root_a @ sigma_b @ root_a
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_cross = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu_a - mu_b
    fd = float(diff @ diff) + float(np.trace(sigma_a)) + float(np.trace(sigma_b)) - 2.0 * trace_cross
    return max(fd, 0.0)  # round-off can leave -1e-12 for identical inputs


def feature_stats(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    arr = _as_float64(feats, "features")
    return arr.mean(axis=0), np.cov(arr, rowvar=False).reshape(arr.shape[1], arr.shape[1])


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """FD between two feature sets (N_a, D) and (N_b, D), in float64."""
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: feats_a has {a.shape[1]}, feats_b has {b.shape[1]}")
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


# ----------------------------------------------------------------------------- user feature networks


class ScriptedFeatureExtractor(nn.Module):
    """A user's feature network loaded from a local file.

    A module with a ``features`` method is taken as a classifier: ``features`` gives the FD features
    and ``forward`` (or a ``logits`` method) gives the class logits. A module with only ``forward``
    is a plain feature network, and accuracy is not scored.
    """

    def __init__(self, module: Any, source: str) -> None:
        super().__init__()
        self.module = module
        self.source = source
        self._has_features = _has_method(module, "features")

    def features(self, x: Tensor) -> Tensor:
        out = self.module.features(x) if self._has_features else self.module(x)
        if not isinstance(out, Tensor) or out.dim() != 2:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"feature network {self.source} must return (B, D) features, got {shape}")
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    @property
    def is_classifier(self) -> bool:
        return self._has_features

    def logits(self, x: Tensor) -> Tensor:
        if not self._has_features:
            raise AttributeError(f"feature network {self.source} has no features method, so its forward is not logits")
        return self.module.logits(x) if _has_method(self.module, "logits") else self.module(x)


def _has_method(module: Any, name: str) -> bool:
    try:
        return callable(getattr(module, name))
    except (AttributeError, RuntimeError):
        return False


def load_feature_extractor(path: str | Path, device: str | torch.device = "cpu") -> ScriptedFeatureExtractor:
    """Load a local feature network: TorchScript (``torch.jit.save``) or, for ``.pt2`` files, a
    ``torch.export`` program. Inputs are (B, C, R, R) images in [-1, 1] as the generator makes them;
    resizing or normalising for the network (for example to 299x299 RGB for Inception) is the
    module's job. Nothing is downloaded."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"eval.feature_extractor: no such file {p} (expected a TorchScript or .pt2 module)")
    try:
        if p.suffix == ".pt2":
            module = torch.export.load(str(p)).module()
        else:
            module = torch.jit.load(str(p), map_location=device)
    except Exception as exc:
        raise ValueError(f"eval.feature_extractor: {p} is not a loadable TorchScript (torch.jit.save) or .pt2 (torch.export) module: {exc}") from None
    extractor = ScriptedFeatureExtractor(module, str(p)).to(device)
    extractor.eval()
    return extractor


# ----------------------------------------------------------------------------- evaluator


def _logits_fn(extractor: Any) -> Callable[[Tensor], Tensor] | None:
    if getattr(extractor, "is_classifier", True) is False:
        return None
    fn = getattr(extractor, "logits", None)
    return fn if callable(fn) else None


def _device_of(module: Any) -> torch.device:
    if isinstance(module, nn.Module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            return tensor.device
    return torch.device("cpu")


class DigitEvaluator:
    """Scores generated digits against the real test split: FD on the extractor's features, and
    (when the extractor is a classifier) the share of images classified as their prompted digit.

    ``floor_fd`` is the FD between real train and real test images: the best a generator can hope
    for with this many samples, and the scale to read every other FD against.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        resolution: int = 16,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 500,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(extractor, FeatureExtractor):
            raise TypeError(f"extractor must have a features(x) method, got {type(extractor).__name__}")
        self.extractor = extractor
        self.resolution = resolution
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _device_of(extractor)
        if isinstance(extractor, nn.Module):
            extractor.to(self.device).eval()
        self._logits = _logits_fn(extractor)

        train = load_digits_split("train", resolution, test_fraction, split_seed)
        test = load_digits_split("test", resolution, test_fraction, split_seed)
        self.test_images, self.test_labels = test.images, test.labels
        if self._logits is not None:
            probe = self._run(self._logits, test.images[:2])
            if probe.dim() != 2 or probe.shape[1] != 10:
                warnings.warn(f"the feature network's logits have shape {list(probe.shape)}, not (B, 10): accuracy is not scored", stacklevel=2)
                self._logits = None
        self.train_features = self.features(train.images)
        self.test_features = self.features(test.images)
        self._test_stats = feature_stats(self.test_features)
        self.floor_fd = frechet_distance_from_stats(*feature_stats(self.train_features), *self._test_stats)
        self.real_accuracy = self.accuracy(test.images, test.labels)

    @property
    def is_classifier(self) -> bool:
        return self._logits is not None

    @torch.no_grad()
    def _run(self, fn: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
        outs = [fn(images[i : i + self.batch_size].to(self.device, torch.float32)).float().cpu() for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(outs)

    def features(self, images: Tensor) -> Tensor:
        """(N, D) float64 features on the CPU."""
        return self._run(self.extractor.features, images).double()

    def accuracy(self, images: Tensor, labels: Tensor) -> float | None:
        if self._logits is None:
            return None
        pred = self._run(self._logits, images).argmax(1)
        return float((pred == labels.cpu()).double().mean())

    def score(self, images: Tensor, labels: Tensor) -> dict[str, float | None]:
        """{"accuracy": share classified as the prompted label (None without logits), "fd": FD vs real test}."""
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        fd = frechet_distance_from_stats(*feature_stats(self.features(images)), *self._test_stats)
        return {"accuracy": self.accuracy(images, labels), "fd": fd}


def build_evaluator(
    cache_dir: str | Path,
    resolution: int = 16,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    feature_extractor: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DigitEvaluator, dict[str, Any]]:
    """The evaluator an ``EvalConfig`` asks for: the cached digit classifier, or the user's feature
    network (``eval.feature_extractor``). Returns it with an info dict for logging."""
    from apexdistill.eval.classifier import load_or_train_classifier

    if feature_extractor:
        extractor: FeatureExtractor = load_feature_extractor(feature_extractor, device)
        info: dict[str, Any] = {"feature_extractor": str(feature_extractor)}
    else:
        extractor, info = load_or_train_classifier(cache_dir, resolution, test_fraction, split_seed)
        info = {"feature_extractor": "digit_classifier", **{f"classifier_{k}": v for k, v in info.items()}}
    evaluator = DigitEvaluator(extractor, resolution, test_fraction, split_seed, device=device)
    info.update(floor_fd=evaluator.floor_fd, real_accuracy=evaluator.real_accuracy)
    return evaluator, info


# ----------------------------------------------------------------------------- results


@dataclass
class EvalRow:
    """One (model, NFE) measurement."""

    model: str
    nfe: int
    accuracy: float | None
    fd: float
    ms_per_image: float
    fd_std: float | None = None  # the spread (std) of the FD over the noise draws, when there are several
    draws: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
