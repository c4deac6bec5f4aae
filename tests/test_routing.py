import torch

import pmod
from pmod.config import ResolvedPMod
from pmod.routing import RoutingPlan, select_tokens
from pmod.tiny import randomize_routers, tiny_llava


def _layers(*ratios: float):
    """The `RoutedLayerSpec`s of a model with one keep ratio per layer (1.0: dense)."""
    return ResolvedPMod.resolve(pmod.PModConfig(schedule=list(ratios)), len(ratios)).layers


def test_plan_counts_and_widths():
    target = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    plan = RoutingPlan.build(target, valid, _layers(1.0, 1.0, 1.0, 0.5, 1.0, 0.3))
    assert plan.keep_counts[3].tolist() == [2, 1]
    assert plan.keep_counts[5].tolist() == [1, 0]  # trunc(4 * 0.3) = 1, trunc(2 * 0.3) = 0
    assert plan.width == {3: 4, 5: 3}  # row 0: 2 text + k; row 1: 2 text + k
    assert plan.uniform == {3: False, 5: False}


def test_k_uses_float32_truncation():
    # 0.29 * 100 = 28.999999999999996 in float64 but 29.0 in float32; the original truncates the float32 product.
    target = torch.ones(1, 100, dtype=torch.bool)
    plan = RoutingPlan.build(target, target, _layers(0.29))
    assert int(100 * 0.29) == 28
    assert plan.keep_counts[0].item() == 29


def test_ties_are_broken_by_position():
    target = torch.tensor([[1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = RoutingPlan.build(target, torch.ones_like(target), _layers(0.5))
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0]])
    sel = select_tokens(logits, plan, 0)
    assert sel.selected[0].nonzero().flatten().tolist() == [1, 3, 4]
    # All equal: the earliest k win, whatever the kernel.
    sel = select_tokens(torch.zeros(1, 6), plan, 0)
    assert sel.selected[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_selection_ranks_fp32_logits_not_bf16_tanh():
    """In bf16, tanh of large logits saturates to the same value; ranking must use the fp32 logits."""
    model = pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.25, 1.0]))
    model.to(torch.bfloat16)
    layer = model.routed_layers()[0]
    ids = torch.randint(1, 100, (1, 20))
    ids[0, 2:18] = model.config.image_token_id
    captured = {}
    layer.register_forward_pre_hook(lambda m, a, kw: captured.update(x=a[0] if a else kw["hidden_states"]),
                                    with_kwargs=True)
    with torch.no_grad():
        layer.router.weight.normal_(0, 2.0)
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28, dtype=torch.bfloat16))
    x = captured["x"][0].float()
    logits = x @ layer.router.weight[0].float() + layer.router.bias.float()
    g_bf16 = (0.2 * torch.tanh(logits) + 1.0).to(torch.bfloat16)
    img = torch.arange(2, 18)
    assert len(set(g_bf16[img].tolist())) < 16  # bf16 router weights do tie...
    expected = img[torch.sort(logits[img], descending=True, stable=True).indices[:4]].sort().values
    got = layer.last_routing.selected[0].nonzero().flatten()
    assert torch.equal(got, expected)  # ...but the selection follows the fp32 logits


def test_routing_is_deterministic_across_runs():
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.5, 0.2]))
    randomize_routers(model)
    ids = torch.randint(1, 100, (2, 24))
    ids[:, 4:20] = model.config.image_token_id
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        first = {i: r.selected.clone() for i, r in model.routing().items()}
        model(input_ids=ids, pixel_values=px)
    assert all(torch.equal(first[i], r.selected) for i, r in model.routing().items())


def test_shared_keep_selection_equals_the_general_one():
    """Rows with the same target count and no padding take the short selection (a slice of the ranking merged with
    the text positions); it selects exactly what the general selection does, ties included, whichever planner
    (device read, or host counts) made the plan."""
    gen = torch.Generator().manual_seed(0)
    layers = _layers(1.0, 0.5, 0.3, 0.05, 0.77)  # 0.05 of 9 keeps none
    target = torch.zeros(3, 20, dtype=torch.bool)
    for row, start in enumerate((2, 5, 9)):
        target[row, start : start + 9] = True  # 9 targets per row, at different places
    valid = torch.ones_like(target)
    shared = RoutingPlan.build(target, valid, layers)
    from_counts = RoutingPlan.build(target, valid, layers, counts=[9, 9, 9], padded=False)
    general = RoutingPlan.build(target, valid, layers, counts=[9, 9, 9], padded=True)  # a mask: nothing shared
    assert shared.shared_keep == from_counts.shared_keep == {1: 4, 2: 2, 3: 0, 4: 6} and general.shared_keep is None
    for logits in (torch.randn(3, 20, generator=gen), torch.randint(0, 3, (3, 20), generator=gen).float()):
        for index in (1, 2, 3, 4):
            want = select_tokens(logits, general, index)
            for plan in (shared, from_counts):
                got = select_tokens(logits, plan, index)
                assert got.chosen is not None and got.slot_valid is None
                assert torch.equal(got.positions, want.positions)
                assert torch.equal(got.selected, want.selected) and torch.equal(got.processed, want.processed)


def test_token_weight_terms_are_fp32_whatever_the_default_dtype():
    """offset + scale * tanh(s): beta and alpha at targets, 1 and 0 elsewhere, in fp32 even when torch's default dtype
    is bf16 (alpha = 0.2 would otherwise become 0.2002 before the layers see it)."""
    target = torch.tensor([[False, True, True, False]])
    plan = RoutingPlan.build(target, torch.ones_like(target), [], counts=[2], padded=False)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        offset, scale = plan.weight_terms(0.2, 0.9)
    finally:
        torch.set_default_dtype(before)
    assert offset.dtype == scale.dtype == torch.float32 and offset.shape == (1, 4, 1)
    f32 = torch.tensor([0.2, 0.9], dtype=torch.float32)
    assert offset[0, :, 0].tolist() == [1.0, f32[1].item(), f32[1].item(), 1.0]
    assert scale[0, :, 0].tolist() == [0.0, f32[0].item(), f32[0].item(), 0.0]
    assert plan.weight_terms(0.2, 0.9)[0] is offset  # made once per forward
