"""The stage / update handshake between routed layers and `PModCache` (the protocol in pmod/cache.py's docstring)."""

import pytest
import torch

from pmod import PModInputError
from pmod.cache import PModCache


def _kv(batch: int, entries: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, entries, 4), torch.randn(batch, 2, entries, 4)  # (B, heads, S, head_dim)


def test_routed_layer_stages_columns_that_its_update_commits():
    cache = PModCache(2)
    dense, routed = cache.layers
    dense.update(*_kv(2, 5))  # step 2: a dense layer holds every token
    held = routed.stage(torch.tensor([[1, 3, 4], [0, 2, -1]]), step_length=5, full=False)  # step 3a
    assert held.tolist() == [[1, 3, 4], [0, 2, -1]] and routed.logical_length == 0  # nothing committed yet
    routed.update(*_kv(2, 3))
    assert routed.columns.tolist() == held.tolist() and routed.has_empty_slots
    assert routed.get_seq_length() == dense.get_seq_length() == 5 and routed.physical_length() == 3
    routed.skip(1, batch=2, device=torch.device("cpu"))  # step 3b: a step in which the layer processed nothing
    assert routed.get_seq_length() == 6 and routed.physical_length() == 3
    assert routed.stage(torch.tensor([[6], [6]]), 1, full=True).tolist() == [[1, 3, 4, 6], [0, 2, -1, 6]]
    routed.update(*_kv(2, 1))
    assert routed.get_seq_length() == 7 and routed.columns.shape == (2, 4)


def test_handshake_violations_are_errors():
    dense, routed = PModCache(2).layers
    dense.update(*_kv(1, 4))
    with pytest.raises(PModInputError, match="dense cache layer cannot become a routed one"):
        dense.stage(torch.tensor([[4]]), 1, full=True)
    routed.stage(torch.tensor([[0, 2]]), 4, full=True)
    with pytest.raises(PModInputError, match="Staged 2 columns but the layer holds 3 entries"):
        routed.update(*_kv(1, 3))
    routed.reset()
    routed.stage(torch.tensor([[0, 2]]), 4, full=True)
    routed.update(*_kv(1, 2))
    with pytest.raises(PModInputError, match="updated without its columns being staged"):
        routed.update(*_kv(1, 1))
