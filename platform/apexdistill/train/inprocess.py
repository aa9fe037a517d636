"""Distill on the built-in digits in this process, without Ray: the library's own backbone, objective,
strategy (``none``), EMA and reference weights, for recipe work and the recipe's CI guard
(``jobs/recipe_ablation.py``, ``tests/test_recipe.py``). Runs on the platform go through ``train.driver``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from apexdistill.config import Config
from apexdistill.train.strategy import Strategy


def distill_digits(cfg: Config, text: Tensor, mask: Tensor, steps: int, batch_size: int,
                   every: int = 0, on_score: Callable[[int, Strategy, float], None] | None = None) -> Strategy:
    """``steps`` steps of ``cfg.objective`` from ``cfg.model`` on the digits' train split, batches of
    ``batch_size`` rows drawn with replacement (seeded by ``run.seed``); ``text``/``mask`` are the ten
    prompts' states (10, L, D). Every ``every`` steps (and at the end) ``on_score(step, strategy,
    trained_seconds)`` is called with the training RNG state saved and restored around it. Returns the
    strategy (its ``ema`` and ``backbone``)."""
    from apexdistill.data.digits import load_digits_split
    from apexdistill.method.base import build_objective
    from apexdistill.models.build import build_backbone
    from apexdistill.train.loop import lr_factor, wrap_with_reference
    from apexdistill.train.strategy import build_strategy

    split = load_digits_split("train", cfg.data.resolution, cfg.data.test_fraction, cfg.data.split_seed)
    torch.manual_seed(cfg.run.seed)
    backbone = build_backbone(cfg.model, 1, cfg.data.resolution, text.shape[-1])
    objective = build_objective(cfg.objective)
    strategy = build_strategy(cfg, 0, 1, torch.device("cpu"))
    wrap_with_reference(strategy, backbone, objective)
    rows = torch.Generator().manual_seed(cfg.run.seed + 7)
    torch.manual_seed(cfg.run.seed + 1)
    trained = 0.0
    backbone.train()
    for step in range(steps):
        started = time.perf_counter()
        strategy.set_lr(lr_factor(cfg, step))
        labels_idx = torch.randint(0, len(split), (batch_size,), generator=rows)
        labels = split.labels[labels_idx]
        batch = {"x": split.images[labels_idx], "text": text[labels], "text_mask": mask[labels]}
        loss, metrics = objective.loss(strategy.model, batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {metrics}")
        strategy.backward(loss)
        strategy.step()
        trained += time.perf_counter() - started
        if on_score is not None and ((every and (step + 1) % every == 0) or step + 1 == steps):
            rng = torch.get_rng_state()  # scoring must not shift the training noise
            on_score(step + 1, strategy, trained)
            torch.set_rng_state(rng)
            backbone.train()
    return strategy
