"""pmod.layer on its own: converting a decoder layer, the router, TanhNorm, the range and cache checks, and one routed
layer's treatment of the tokens it skipped (method.md section 2), read off a forward through a tiny causal LM."""

import pytest
import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import pmod
from pmod.config import RoutedLayerSpec
from pmod.errors import PModConfigError, PModInputError, UnsupportedModelError
from pmod.layer import ROUTED_LAYERS, PModLayerMixin, Router, _check_cache, _check_weight_range, convert_decoder_layer
from pmod.routing import keep_count
from pmod.tiny import randomize_routers, tiny_causal_lm


def spec(**changes):
    values = dict(index=1, keep_ratio=0.5, alpha=0.2, beta=1.0, tanh_norm=True, string=True, router_bias=True,
                  router_zero_init=True)
    return RoutedLayerSpec(**{**values, **changes})


def test_convert_keeps_the_dense_parameters_and_adds_a_zero_fp32_router():
    dense = tiny_causal_lm(num_layers=2).model.layers[1]
    before = {name: p for name, p in dense.named_parameters()}
    layer = convert_decoder_layer(dense, spec())
    assert layer is dense and isinstance(layer, PModLayerMixin) and type(layer) is ROUTED_LAYERS[LlamaDecoderLayer]
    after = dict(layer.named_parameters())
    assert all(after[name] is p for name, p in before.items())  # the same tensors: dense checkpoints load
    assert set(after) - set(before) == {"router.weight", "router.bias"}
    assert isinstance(layer.router, Router) and not layer.router.weight.any() and not layer.router.bias.any()
    assert convert_decoder_layer(layer, spec(index=1)) is layer and layer.router.weight is after["router.weight"]


def test_a_layer_without_a_routed_class_is_refused_by_name():
    class Odd(nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match=r"no routed version of the decoder layer Odd.*LlamaDecoderLayer"):
        convert_decoder_layer(Odd(), spec())


def test_the_router_scores_in_float32_whatever_the_layer_dtype():
    router = Router(8, 1).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    scores = router(x)
    assert scores.dtype == torch.float32
    expected = x.float() @ router.weight.float().T + router.bias.float()
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("tanh_norm", [True, False])
def test_router_weight_is_tanh_norm(tanh_norm):
    layer = convert_decoder_layer(tiny_causal_lm(num_layers=2).model.layers[1], spec(alpha=0.3, beta=0.9,
                                                                                     tanh_norm=tanh_norm))
    s = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    expected = 0.3 * (torch.tanh(s) if tanh_norm else s) + 0.9
    torch.testing.assert_close(layer.router_weight(s), expected)


def test_the_router_scores_in_fp32_under_autocast():
    """Mixed-precision training runs the model under autocast (the Trainer's bf16); the router's product must stay
    fp32 there too, or scores tie and the ranking changes with the precision."""
    model = tiny_causal_lm(num_layers=3)
    routed = pmod.apply_pmod(model, pmod.PModConfig(schedule=[1.0, 0.5, 0.5]))
    randomize_routers(routed)
    router = routed.model.layers[1].router
    x = torch.randn(2, 7, model.config.hidden_size)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(x)
        assert torch.nn.functional.linear(x, router.weight).dtype == torch.bfloat16  # autocast is on
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)


def test_router_weights_beyond_the_dtype_and_a_foreign_cache_are_refused():
    with pytest.raises(PModConfigError, match="beyond what torch.float16 holds"):
        _check_weight_range(spec(alpha=1e5), torch.float16)
    _check_weight_range(spec(alpha=1e5), torch.float32)  # within float32's range
    with pytest.raises(PModInputError, match="need a pmod.PModCache, got a DynamicCache"):
        _check_cache(DynamicCache())


@pytest.mark.parametrize("string", [True, False])
def test_a_routed_layer_processes_its_top_k_targets_and_scales_the_skipped_ones(string):
    """Layer l keeps the floor(R_l * N) targets with the highest router scores; every text token is processed; a
    skipped target leaves the layer as g * x (STRing) or unchanged (string=False), g = alpha * tanh(s) + beta."""
    model = pmod.apply_pmod(tiny_causal_lm(num_layers=4),
                            pmod.PModConfig(schedule=[1.0, 0.6, 0.3, 1.0], string=string)).eval()
    randomize_routers(model)
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(2, 20, dtype=torch.bool)
    target[0, 3:13] = True  # 10 targets
    target[1, 5:12] = True  # 7 targets
    seen = {}
    for index, layer in model.routed_layers().items():
        layer.register_forward_hook(
            lambda module, args, kwargs, out, index=index: seen.update({index: (kwargs.get("hidden_states",
                                                                                          args[0] if args else None),
                                                                                out)}),
            with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, target_mask=target)
    for index, layer in model.routed_layers().items():
        x, out = seen[index]
        out = out[0] if isinstance(out, tuple) else out
        routing = layer.last_routing
        assert torch.equal(routing.target, target)
        for row in range(2):
            n = int(target[row].sum())
            chosen = routing.selected[row].nonzero().flatten()
            assert len(chosen) == keep_count(n, layer.pmod_spec.keep_ratio)
            scores = routing.router_logits[row].masked_fill(~target[row], float("-inf"))
            assert set(chosen.tolist()) == set(scores.topk(len(chosen)).indices.tolist())
            assert torch.equal(routing.processed[row], ~target[row] | routing.selected[row])
            skipped = target[row] & ~routing.selected[row]
            assert skipped.any()
            g = layer.router_weight(routing.router_logits[row][skipped])[:, None]
            want = g * x[row][skipped] if string else x[row][skipped]
            torch.testing.assert_close(out[row][skipped], want.to(out.dtype))
