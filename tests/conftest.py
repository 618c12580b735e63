"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the module's tests.

    The models in tests are tiny, so thread start-up dominates their cost, and on a 2-core machine shared with other
    processes two threads per process thrash (training steps measured 10x slower). Results do not depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
