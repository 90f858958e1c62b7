"""Unit tests run torch on one intra-op thread. The tiny model's per-step tensors are so small
that a second OpenMP thread gains nothing, and on this 2-core machine, while another process holds
a core, it makes every op wait on it: measured, 8 prompts x 24 greedy tokens one at a time took
0.2 s on two threads on an idle machine, 11 s on two threads next to a busy process, and 0.16 s on
one thread next to the same process."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
