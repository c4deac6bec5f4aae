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
    held, first_new = routed.stage(torch.tensor([[1, 3, 4], [0, 2, -1]]), step_length=5, full=False)  # step 3a
    assert first_new == 0
    assert held.tolist() == [[1, 3, 4], [0, 2, -1]] and routed.logical_length == 0  # nothing committed yet
    routed.update(*_kv(2, 3))
    assert routed.columns.tolist() == held.tolist() and routed.has_empty_slots
    assert routed.get_seq_length() == dense.get_seq_length() == 5 and routed.physical_length() == 3
    routed.skip(1, batch=2, device=torch.device("cpu"))  # step 3b: a step in which the layer processed nothing
    assert routed.get_seq_length() == 6 and routed.physical_length() == 3
    held, first_new = routed.stage(torch.tensor([[6], [6]]), 1, full=True)
    assert held.tolist() == [[1, 3, 4, 6], [0, 2, -1, 6]] and first_new == 3
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


def test_static_layers_follow_the_handshake_in_place():
    """`PModStaticCache`: a dense layer holds max_cache_len entries, a routed one max_cache_len - T + S (sized at the
    prompt); entries, columns and lengths are written in place, so their storage never moves."""
    from pmod.cache import PModStaticCache

    cache = PModStaticCache(2, max_cache_len=8, num_heads=2, head_dim=4, dtype=torch.float32)
    dense, routed = cache.layers
    assert not cache.has_past()
    dense.update(*_kv(2, 5))
    held, first_new = routed.stage(torch.tensor([[1, 3, 4], [0, 2, -1]]), step_length=5, full=False)
    assert held.shape == (2, 8 - 5 + 3) and int(first_new) == 0 and held[:, 3:].eq(-1).all()
    routed.update(*_kv(2, 3))
    assert cache.has_past() and int(routed.get_seq_length()) == int(dense.get_seq_length()) == 5
    assert dense.keys.shape[2] == 8 and routed.keys.shape[2] == 6 and routed.physical_length() == 3
    address = routed.keys.data_ptr(), routed.columns.data_ptr()
    held, first_new = routed.stage(torch.tensor([[5], [5]]), 1, full=True)
    assert int(first_new) == 3 and held[:, 3].tolist() == [5, 5]
    routed.update(*_kv(2, 1))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert routed.columns[:, :4].tolist() == [[0, 2, -1, 5], [1, 3, 4, 5]]
    assert (routed.keys.data_ptr(), routed.columns.data_ptr()) == address and int(routed.get_seq_length()) == 6
    with pytest.raises(PModInputError, match="Staged 1 columns but the layer was given 2"):
        routed.stage(torch.tensor([[6], [6]]), 1, full=True)
        routed.update(*_kv(2, 2))
    with pytest.raises(PModInputError, match="holds 2 sequences, the step has 3"):
        dense.update(*_kv(3, 1))
    cache.reset()
    assert not cache.has_past() and routed.columns is None and int(routed.get_seq_length()) == 0
    with pytest.raises(PModInputError, match="larger max_cache_len"):
        dense.update(*_kv(2, 9))
