"""Static-cache and compiled decoding (`pmod.PModStaticCache`): the same tokens and logits as the dynamic `PModCache`,
one graph for every decoding step (no graph break, no recompilation), for LLaVA, LLaVA-NeXT and Qwen2-VL (M-RoPE)."""

import pytest
import torch
from transformers import CompileConfig

import pmod
from pmod.compat import CACHE_KWARG, output_cache
from pmod.efficiency import kv_cache_report
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_next, tiny_qwen2_vl
from tests.helpers.inputs import llava_inputs, next_inputs
from tests.helpers.qwen_inputs import qwen_inputs

SCHEDULE = [1.0, 0.5, 0.3, 0.6]


def _dense(family: str):
    builders = {"llava": lambda: tiny_llava(num_layers=4), "llava_next": lambda: tiny_llava_next(num_layers=4),
                "qwen2_vl": lambda: tiny_qwen2_vl(version="2")}
    return builders[family]()


def _case(family: str):
    """A p-MoD model with random routers and a left-padded batch with 0-2 images (video too for Qwen2-VL), and the
    tokens generation must suppress (a random model may emit placeholders)."""
    model = pmod.apply_pmod(_dense(family), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    cfg = model.config
    if family == "llava":
        inputs, _ = llava_inputs(model)
    elif family == "llava_next":
        inputs, _ = next_inputs(model, [(28, 56), (56, 56), None, (84, 28)], [(2, 3), (1, 1), (6, 2), (3, 0)])
    else:
        inputs, _ = qwen_inputs(model)
    inputs.pop("position_ids", None)
    suppress = [cfg.image_token_id] + [getattr(cfg, n) for n in ("video_token_id", "vision_start_token_id",
                                                                  "vision_end_token_id") if getattr(cfg, n, None)]
    return model.eval(), inputs, suppress


def _compile_config(backend: str = "eager") -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = True  # transformers compiles generate() on CPU only when told to
    return config


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_static_cache_generation_equals_the_dynamic_cache(family):
    """Greedy generation with cache_implementation="static" (eager, then compiled with fullgraph=True) gives the
    dynamic cache's tokens and logits; the compiled steps are one graph; routed layers keep their KV savings."""
    model, inputs, suppress = _case(family)
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=suppress, return_dict_in_generate=True,
              output_logits=True)
    torch._dynamo.reset()
    with torch.no_grad():
        dynamic = model.generate(**inputs, **kw)
        static = model.generate(**inputs, **kw, cache_implementation="static")
        from torch._dynamo.utils import counters

        counters.clear()
        compiled = model.generate(**inputs, **kw, cache_implementation="static", compile_config=_compile_config())
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
        counters.clear()
        _dense(family).generate(**inputs, **kw, cache_implementation="static", compile_config=_compile_config())
    # the dense model's graphs: one for the 4 compiled steps (no break, no recompile), except where transformers'
    # own generate changes an input's shape every step (Qwen2-VL's mm_token_type_ids on transformers 5.17)
    assert graphs == counters["stats"]["unique_graphs"]
    if family != "qwen2_vl":
        assert graphs == 1
    assert torch.equal(static.sequences, dynamic.sequences) and torch.equal(compiled.sequences, dynamic.sequences)
    for run in (static, compiled):
        for got, want in zip(run.logits, dynamic.logits):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cache = output_cache(static)
    assert isinstance(cache, pmod.PModStaticCache)
    # routed layers hold max_cache_len - T + S entries: the dynamic cache's entries plus the room left unused, so
    # the static cache saves what the dynamic one saves against a dense cache of its length
    room = cache.layers[0].max_cache_len - output_cache(dynamic).get_seq_length()
    report, grown = kv_cache_report(cache), kv_cache_report(output_cache(dynamic))
    for held, want in zip(report.layers, grown.layers):
        assert held.slots == want.slots + inputs["input_ids"].shape[0] * room
    assert report.ratio < 1.0


def test_a_decoding_loop_with_a_static_cache_compiles_to_one_graph():
    """A plain decoding loop (not generate): each step's inputs keep their shapes (the padding mask covers the whole
    cache), the compiled step runs without graph breaks or recompilation and equals eager; inductor's kernels too."""
    model, inputs, _ = _case("llava")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = ids.shape
    steps = 4

    def step(token, full_mask, position, cache):
        return model(input_ids=token, attention_mask=full_mask, position_ids=position, **{CACHE_KWARG: cache}).logits

    def decode(step_fn):
        cache = pmod.PModStaticCache.for_model(model, length + steps + 1)
        token = model(**inputs, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        full_mask = torch.cat([mask, torch.zeros(batch, steps + 1, dtype=mask.dtype)], 1)  # (B, max_cache_len)
        logits = []
        for i in range(steps):
            full_mask[:, length + i] = 1
            position = (full_mask.cumsum(-1) - 1)[:, length + i : length + i + 1]
            out = step_fn(token, full_mask, position, cache)[:, -1]
            logits.append(out.clone())
            token = out.argmax(-1, keepdim=True)
        return torch.stack(logits)

    from torch._dynamo.utils import counters

    with torch.no_grad():
        eager = decode(step)
        for backend in ("eager", "inductor"):
            torch._dynamo.reset()
            counters.clear()
            compiled = decode(torch.compile(step, fullgraph=True, backend=backend))
            assert counters["stats"]["unique_graphs"] == 1, backend
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4, msg=backend)


def test_static_cache_beam_search_and_sampling_equal_the_dynamic_cache():
    model, inputs, suppress = _case("llava")
    with torch.no_grad():
        for kw in (dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=5)):
            kw.update(max_new_tokens=4, suppress_tokens=suppress)
            torch.manual_seed(1)
            dynamic = model.generate(**inputs, **kw)
            torch.manual_seed(1)
            static = model.generate(**inputs, **kw, cache_implementation="static")
            assert torch.equal(static, dynamic), kw


def test_static_cache_refuses_what_it_cannot_hold():
    model, inputs, _ = _case("llava")
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), pytest.raises(pmod.PModInputError, match="larger max_cache_len"):
        model(**inputs, **{CACHE_KWARG: pmod.PModStaticCache.for_model(model, length - 1)})
    from transformers import StaticCache

    try:
        StaticCache(config=model.config, max_cache_len=4, offloading=True)
    except RuntimeError as exc:  # a CUDA build of torch on a machine without a GPU driver cannot make its stream
        pytest.skip(f"no offloaded cache on this machine: {exc}")
    with torch.no_grad(), pytest.raises(pmod.PModInputError, match="offloaded"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="offloaded_static")


def test_keep_count_on_the_host_equals_the_float32_product():
    from pmod.routing import keep_count

    ratios = [1.0, 0.85, 0.5, 0.3, 0.15, 0.1, 1 / 3, 0.7, 0.123456789, 0.9999999]
    counts = list(range(0, 700)) + [2304, 2880, 4095, 65535]
    for ratio in ratios:
        want = torch.floor(torch.tensor(counts, dtype=torch.float32) * torch.tensor(ratio, dtype=torch.float32))
        assert [keep_count(n, ratio) for n in counts] == want.long().tolist(), ratio


def test_target_counts_plan_prefill_on_the_host_and_compile_without_breaks():
    """Given each row's target count, routing is planned without reading the device: the same logits as the plan
    that reads it; a causal LM's prefill compiles with fullgraph=True; a LLaVA prefill has no graph break in pmod's
    code (transformers' own LLaVA forward keeps its breaks); a wrong count is caught on the device."""
    from pmod.tiny import tiny_causal_lm

    model, inputs, _ = _case("llava")
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1)  # transformers' forward breaks differently once it has run
        want = model(**inputs).logits
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(model(**inputs, target_counts=counts).logits[mask], want[mask], rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda **kw: model(**kw).logits)(**inputs, target_counts=counts)
    # a break inside transformers' forward lists the calling frames too: the innermost frame says where it is
    pmod_breaks = [b.reason for b in explained.break_reasons if "/pmod/" in b.user_stack[-1].filename]
    assert pmod_breaks == []
    with torch.no_grad(), pytest.raises(RuntimeError, match="target_counts / token_counts differ"):
        model(**inputs, target_counts=[c + 1 for c in counts])
    with pytest.raises(pmod.PModInputError, match="target_counts must hold 4 counts"):
        model(**inputs, target_counts=counts[:3])

    lm = pmod.apply_pmod(tiny_causal_lm("llama", num_layers=4), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(lm)
    ids = torch.randint(1, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(2, 40, dtype=torch.bool)
    target[:, 4:36] = True

    def prefill(ids, target):
        return lm(input_ids=ids, target_mask=target, target_counts=[32, 32]).logits

    torch._dynamo.reset()
    with torch.no_grad():
        eager = lm(input_ids=ids, target_mask=target).logits
        compiled = torch.compile(prefill, fullgraph=True, backend="eager")(ids, target)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_the_cuda_attention_backend_choice_traces_into_one_graph():
    """On CUDA routed layers run attention inside `sdpa_kernel` (no cuDNN); a compiled GPU step must trace through it
    without a break. Checked here on CPU (no GPU in CI): the context manager is what dynamo has to support."""
    import torch.nn.functional as F

    from pmod.layer import attention_backends

    def attend(q, k, v):
        with attention_backends(torch.device("cuda")):
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 5, 8)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(attend, fullgraph=True, backend="eager")(q, q, q), attend(q, q, q))
