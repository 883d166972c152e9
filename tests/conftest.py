"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny import ARCHITECTURES

# Two torch threads on two shared cores run several times slower than one.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(params=ARCHITECTURES)
def architecture(request: pytest.FixtureRequest) -> str:
    return request.param
