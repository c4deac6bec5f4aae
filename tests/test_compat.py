"""The KV cache reaches p-MoD under whichever name the installed transformers uses; any other cache is refused."""

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel

import pmod
from pmod.compat import CACHE_KWARG, CACHE_NAMES, output_cache
from pmod.families import FAMILIES
from pmod.routing import RoutingPlan
from pmod.tiny import randomize_routers, tiny_llava
from tests.helpers.inputs import llava_inputs


def _model():
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    return model.eval()


def test_the_installed_transformers_uses_the_detected_cache_keyword():
    """Every class pmod calls or wraps takes the cache under CACHE_KWARG: a rename pmod does not know fails here."""
    layers = {layer for family in FAMILIES for layer in family.layers}
    for cls in (*layers, LlamaAttention, LlamaModel, *(family.dense for family in FAMILIES)):
        assert CACHE_KWARG in inspect.signature(cls.forward).parameters, cls.__name__


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_routed_layer_refuses_any_other_cache(name):
    model = _model()
    ids = torch.randint(1, 100, (1, 8))
    layer = model.routed_layers()[0]
    plan = RoutingPlan.build(torch.zeros_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool),
                             model.pmod.layers)
    with pytest.raises(pmod.PModInputError, match="need a pmod.PModCache, got a DynamicCache"):
        layer(torch.randn(1, 8, 32), pmod_plan=plan, **{name: DynamicCache()})


def test_model_takes_the_cache_under_either_name():
    """A decoding step gives the same logits whichever name carries the cache, uses the cache it was given, and
    equals recomputing the whole sequence."""
    model = _model()
    inputs, _ = llava_inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new = torch.randint(1, 120, (ids.shape[0], 1), generator=torch.Generator().manual_seed(3))
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prefill = output_cache(model(**inputs, use_cache=True))
        assert isinstance(prefill, pmod.PModCache)
        steps = {}
        for name in CACHE_NAMES:
            cache = copy.deepcopy(prefill)
            steps[name] = model(input_ids=new, attention_mask=full_mask, position_ids=pos[:, -1:],
                                **{name: cache}).logits
            assert cache.get_seq_length() == ids.shape[1] + 1, name  # this cache, not a new one, was extended
        full = model(input_ids=torch.cat([ids, new], 1), attention_mask=full_mask, position_ids=pos,
                     pixel_values=inputs["pixel_values"], use_cache=False).logits
    for name, logits in steps.items():
        torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(pmod.PModInputError, match="Both `cache` and `past_key_values`"):
        model(input_ids=new, attention_mask=full_mask, cache=copy.deepcopy(prefill),
              past_key_values=copy.deepcopy(prefill))


def test_the_installed_transformers_loads_processor_parts_through_the_detected_hook(tmp_path):
    """pmod supplies its frame video processor through the hook `subprocessor_hook` names; a release that loads parts
    another way fails here, not as a torchvision ImportError in a user's processor loading."""
    from transformers.processing_utils import ProcessorMixin

    from pmod.compat import SUBPROCESSOR_HOOKS, subprocessor_hook
    from pmod.processors import FRAME_VIDEO_PROCESSORS, processor_class

    hook = subprocessor_hook()
    assert hook in vars(ProcessorMixin)
    # the hook is the one ProcessorMixin.from_pretrained calls
    assert f"cls.{hook}(" in inspect.getsource(ProcessorMixin.from_pretrained)
    for other in SUBPROCESSOR_HOOKS[SUBPROCESSOR_HOOKS.index(hook) + 1:]:
        assert f"cls.{other}(" not in inspect.getsource(ProcessorMixin.from_pretrained)
    if hook == SUBPROCESSOR_HOOKS[0]:  # a part already in processor_dict as an object is kept, not loaded again
        source = inspect.getsource(getattr(ProcessorMixin, hook))
        assert "isinstance(sub_processor_config := processor_dict.get(sub_processor_type), dict)" in source
    from pmod.processors import has_torchvision

    if not has_torchvision():
        for name in FRAME_VIDEO_PROCESSORS:
            assert hook in vars(processor_class(name)), name
