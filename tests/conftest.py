"""Shared fixtures. Ray-using tests get one local Ray instance per session (start-up costs seconds)."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores shared with Ray's worker processes: one torch thread per process avoids the
# oversubscription that makes small CPU kernels tens of times slower.
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def minilm_states():
    """The ten digit captions encoded once with the real MiniLM: (10, L, 384) states and masks."""
    from apexdistill.data.digits import CAPTIONS
    from apexdistill.models.text import TextEncoder

    return TextEncoder(max_length=16).encode(CAPTIONS)
