"""Class-balanced generation with fixed noise, timed, and the per-NFE evaluation rows built on it.

Every model evaluated with the same ``seed`` starts from exactly the same noise for the same prompt,
so differences between rows are differences between models, not between draws.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Literal

import torch
from torch import Tensor, nn

from apexdistill.eval.metrics import DigitEvaluator, EvalRow
from apexdistill.method.sampler import VelocityFn, sample_euler, sample_few_step

Sampler = Literal["few_step", "euler"]
DEFAULT_SEED = 1234  # eval.seed's default


def _device_of(model: Any, fallback: torch.device) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return fallback


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(model: VelocityFn, z: Tensor, text: Tensor, mask: Tensor | None, nfe: int, sampler: Sampler, generator: torch.Generator) -> Tensor:
    if sampler == "few_step":
        return sample_few_step(model, z, text, mask, nfe=nfe, generator=generator)
    if sampler == "euler":
        return sample_euler(model, z, text, mask, nfe=nfe)
    raise ValueError(f"sampler must be 'few_step' or 'euler', got {sampler!r}")


def generate(
    model: VelocityFn,
    text_table: Tensor,
    mask_table: Tensor | None,
    nfe: int,
    sampler: Sampler = "few_step",
    samples_per_class: int = 100,
    seed: int = DEFAULT_SEED,
    batch_size: int = 500,
    channels: int = 1,
    resolution: int = 16,
    warmup: bool = True,
) -> tuple[Tensor, Tensor, float]:
    """Sample ``samples_per_class`` images of each of the 10 digits.

    ``text_table`` (10, L, D) and ``mask_table`` (10, L) hold the encoded caption of each digit;
    labels are 0..9 repeated, so every batch is class-balanced. Returns images (N, C, R, R) clamped
    to [-1, 1] on the CPU, labels (N,), and milliseconds per image of the sampling alone (one untimed
    warm-up model call on a full batch first, so one-time costs such as kernel selection do not count).
    """
    if text_table.dim() != 3 or text_table.shape[0] != 10:
        raise ValueError(f"text_table must be (10, L, D), one row per digit, got {list(text_table.shape)}")
    if mask_table is not None and tuple(mask_table.shape) != tuple(text_table.shape[:2]):
        raise ValueError(f"mask_table must be (10, L) = {list(text_table.shape[:2])}, got {list(mask_table.shape)}")
    if nfe < 1 or samples_per_class < 1 or batch_size < 1:
        raise ValueError(f"nfe, samples_per_class and batch_size must be >= 1, got {nfe}, {samples_per_class}, {batch_size}")

    device = _device_of(model, text_table.device)
    n = 10 * samples_per_class
    labels = torch.arange(10).repeat(samples_per_class)
    # All noise is drawn up front on the CPU: the same seed gives the same z per sample whatever the
    # batch size or device.
    z_all = torch.randn((n, channels, resolution, resolution), generator=torch.Generator().manual_seed(seed))
    renoise = torch.Generator(device=device).manual_seed(seed + 1)  # few-step re-noising (2+ NFE)
    text_table = text_table.to(device)
    mask_table = mask_table.to(device) if mask_table is not None else None

    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    images, elapsed = [], 0.0
    try:
        with torch.no_grad():
            if warmup:
                idx = labels[: min(batch_size, n)].to(device)
                z = torch.randn(z_all[: idx.shape[0]].shape, generator=torch.Generator().manual_seed(seed + 2)).to(device)
                t = torch.full((idx.shape[0],), 0.5, device=device)
                model(z, t, text_table[idx], mask_table[idx] if mask_table is not None else None)
                _sync(device)
            for start in range(0, n, batch_size):
                idx = labels[start : start + batch_size].to(device)
                z = z_all[start : start + batch_size].to(device)
                text, mask = text_table[idx], (mask_table[idx] if mask_table is not None else None)
                _sync(device)
                t0 = time.perf_counter()
                x = _sample(model, z, text, mask, nfe, sampler, renoise)
                _sync(device)
                elapsed += time.perf_counter() - t0
                images.append(x.float().clamp(-1.0, 1.0).cpu())
    finally:
        if was_training:
            model.train()
    return torch.cat(images), labels, 1000.0 * elapsed / n


DRAW_SEED_STRIDE = 1000  # draw i uses seed + 1000*i (generate itself takes seed, seed + 1 and seed + 2)


def evaluate_rows(
    name: str,
    model: VelocityFn,
    evaluator: DigitEvaluator,
    text_table: Tensor,
    mask_table: Tensor | None,
    nfes: list[int],
    sampler: Sampler = "few_step",
    draws: int = 1,
    **kw: Any,
) -> list[EvalRow]:
    """One ``EvalRow`` per NFE: generate with fixed noise, score against the real test split.
    ``kw`` goes to ``generate`` (samples_per_class, seed, batch_size, channels, resolution).

    With ``draws`` D > 1 each row is scored on D independent noise draws (seeds ``seed + 1000*i``) and
    reports the mean FD and accuracy, with ``fd_std`` the spread of the D scores: on the digits one
    draw of 1000 images moves the FD proxy by 0.25-0.35 (std) with the noise alone. The time is the first
    draw's."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    kw.setdefault("resolution", evaluator.resolution)
    seed = kw.pop("seed", DEFAULT_SEED)
    rows = []
    for nfe in nfes:
        fds, accs, ms = [], [], None
        for i in range(draws):
            images, labels, elapsed = generate(model, text_table, mask_table, nfe, sampler, seed=seed + DRAW_SEED_STRIDE * i,
                                               warmup=i == 0, **kw)
            scores = evaluator.score(images, labels)
            fds.append(scores["fd"])
            accs.append(scores["accuracy"])
            ms = elapsed if ms is None else ms
        accuracy = None if accs[0] is None else sum(accs) / draws
        spread = statistics.stdev(fds) if draws > 1 else None
        rows.append(EvalRow(model=name, nfe=int(nfe), accuracy=accuracy, fd=sum(fds) / draws, ms_per_image=ms, fd_std=spread,
                            draws=draws))
    return rows
