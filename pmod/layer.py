"""The p-MoD decoder layer (method.md section 2).

`convert_decoder_layer` turns an installed transformers decoder layer (Llama, Qwen2, Mistral, ...) into
its routed version in place: the instance's class becomes a subclass of its own class with
`PModLayerMixin` in front, it keeps every child module (so parameter names, dense checkpoints, gradient
checkpointing and hooks keep working) and gains `router`, an `nn.Linear(hidden_size, 1)`, and ``pmod_spec``, its
`RoutedLayerSpec` (index, keep ratio, TanhNorm and STRing settings).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cache import PModCache, PModStaticCache
from .compat import CACHE_KWARG, pop_cache
from .config import RoutedLayerSpec
from .errors import PModConfigError, PModInputError, UnsupportedModelError
from .routing import LayerRouting, RoutingPlan, Selection, select_tokens

SUPPORTED_ATTENTION = ("eager", "sdpa")
# each transformers decoder layer class -> its routed class (pmod/families.py), filled as they are defined
ROUTED_LAYERS: dict[type[nn.Module], type[nn.Module]] = {}


class PModLayerMixin:
    """Routed forward for pre-norm decoder layers with `input_layernorm`, `self_attn`,
    `post_attention_layernorm` and `mlp` children. A routed class is ``class PModX(PModLayerMixin, X)``."""

    router: Router
    pmod_spec: RoutedLayerSpec
    last_routing: LayerRouting | None
    reads_position_ids: bool = False  # the layer's attention reads position_ids (not only the rotary tables)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if PModLayerMixin not in cls.__bases__:
            return  # a subclass of a routed class (instrumentation, a test) does not replace it
        dense = next(c for c in cls.__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, PModLayerMixin))
        if dense in ROUTED_LAYERS:
            raise TypeError(f"{dense.__name__} already has a routed class, {ROUTED_LAYERS[dense].__qualname__}; "
                            f"subclass that one instead of defining {cls.__qualname__}.")
        ROUTED_LAYERS[dense] = cls

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        pmod_plan: RoutingPlan | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # the cache arrives as `cache` or `past_key_values`, whichever the installed transformers uses
        cache = pop_cache(kwargs)
        spec = self.pmod_spec
        if pmod_plan is None:
            raise PModInputError(
                f"p-MoD layer {spec.index} was called without a routing plan. Call the top-level model "
                "returned by pmod.apply_pmod / pmod.load_model (it plans routing from input_ids), not its inner "
                "language model."
            )
        if cache is not None:
            _check_cache(cache)  # any other cache would hold every token: loud, never a silently different answer
        attn_impl = self.self_attn.config._attn_implementation
        if attn_impl not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"Attention backend {attn_impl!r} is not supported by p-MoD routed layers; use one of "
                f"{SUPPORTED_ATTENTION} (model.set_attn_implementation('sdpa'))."
            )
        x = hidden_states
        _check_weight_range(spec, x.dtype)
        batch, length, _ = x.shape
        float_dtype = x.dtype if attn_impl == "eager" else None
        attend = {CACHE_KWARG: cache, "use_cache": use_cache, **kwargs}

        if pmod_plan.dense_step:
            # Nothing to route (a decoding step, a text-only batch): the plain dense layer, on every token.
            mask, held = self._dense_step_mask(attention_mask, cache, pmod_plan, batch, length, x.device, float_dtype)
            if kwargs.get("output_attentions"):
                self._keep_layout(None, None, held, attention_mask, cache, pmod_plan, length)
            h, mlp_out = self._attention_mlp(x, mask, position_ids, position_embeddings, attend)
            if pmod_plan.decoding and not self.training:
                # a decoding step neither runs the router nor replaces the prompt's routing record
                return h + mlp_out
            logits = self.router(x).squeeze(-1)  # (B, T) fp32
            positions = torch.arange(length, device=x.device).expand(batch, length)
            valid = pmod_plan.valid
            self._record(
                pmod_plan, Selection(positions, torch.ones_like(valid), valid, torch.zeros_like(valid)), logits
            )
            if torch.is_grad_enabled() and self.training:
                # Keep the router in the graph (zero gradient): DDP without find_unused_parameters needs every
                # parameter to take part in every step, text-only batches included.
                return h + mlp_out + 0.0 * logits.sum().to(h.dtype)
            return h + mlp_out

        # Router on the raw layer input, in fp32 so ranking does not suffer bf16 ties.
        scores = self.router(x)  # (B, T, 1) fp32
        logits = scores.squeeze(-1)  # (B, T)
        sel = select_tokens(logits, pmod_plan, spec.index)
        pos = sel.positions  # (B, S)
        width = pos.shape[1]
        # STRing: targets carry g = alpha * tanh(s) + beta; text tokens are plain dense tokens (weight 1).
        weight = self._token_weights(scores, pmod_plan).to(x.dtype)  # (B, T, 1)
        skip_weight = weight if spec.string else torch.ones_like(weight)  # (B, T, 1)
        # Skipped targets become g * x, padding passes through; processed slots are overwritten below (in place, so
        # the product must be contiguous even when the caller's hidden states are not).
        out = (x * skip_weight).contiguous()
        if width == 0:  # no example processes any token in this layer
            if cache is not None:
                cache.layers[spec.index].skip(length, batch, x.device)  # protocol step 3b (pmod/cache.py)
            self._record(pmod_plan, sel, logits)
            return out

        rows = _Rows(pos, pmod_plan.row_start)
        xs = rows.take(x)  # (B, S, D)
        cos, sin = _rotary_rows(position_embeddings, pmod_plan, rows)  # (B, S, head_dim), original positions
        # the gathered tokens' positions live in (cos, sin); position ids are passed on only to attentions that read
        # them (`reads_position_ids`: Ministral 3's length scaling), gathered like the tokens (flash-attention would
        # read non-contiguous ids at batch 1 as packed sequences; eager and sdpa do not read them)
        position_ids = _position_rows(position_ids, rows) if self.reads_position_ids else None
        uniform = pmod_plan.uniform[spec.index]
        mask, held = self._stage_and_mask(attention_mask, sel, cache, pmod_plan, length, uniform, float_dtype)
        if kwargs.get("output_attentions"):
            self._keep_layout(pos, sel.slot_valid, held, attention_mask, cache, pmod_plan, length)
        h, mlp_out = self._attention_mlp(xs, mask, position_ids, (cos, sin), attend)

        out_slots = torch.addcmul(h, rows.take(weight), mlp_out)  # h + g * mlp_out, (B, S, D), one kernel
        if not uniform:
            # Empty slots point at distinct unprocessed positions: write back what `out` holds there.
            out_slots = torch.where(sel.slot_valid[..., None], out_slots, xs * rows.take(skip_weight))
        # out is a fresh product that no saved tensor refers to; slots hold distinct positions.
        rows.put(out, out_slots)
        self._record(pmod_plan, sel, logits)
        return out

    def _token_weights(self, scores: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """(B, T, 1) fp32 weight of every token from the router scores ``scores`` (B, T, 1): g (`router_weight`) at
        targets, 1 elsewhere, as ``offset + scale * tanh(s)`` with the plan's per-forward terms (two kernels where
        `router_weight` and a masked fill take four; a GPU at batch 1 pays per kernel)."""
        spec = self.pmod_spec
        offset, scale = plan.weight_terms(spec.alpha, spec.beta)  # (B, T, 1) each
        return torch.addcmul(offset, torch.tanh(scores) if spec.tanh_norm else scores, scale)

    def router_weight(self, logits: torch.Tensor) -> torch.Tensor:
        """TanhNorm: g = alpha * tanh(s) + beta (``alpha * s + beta`` with the ``tanh_norm=False`` ablation)."""
        spec = self.pmod_spec
        return spec.alpha * (torch.tanh(logits) if spec.tanh_norm else logits) + spec.beta

    def _attention_mlp(self, xs, mask, position_ids, position_embeddings, attend: dict):
        """Pre-norm attention and MLP of the processed tokens: (h = x + Attn, MLP(norm2(h))). A family whose layer
        composes them otherwise overrides this (the routed layer weights the second, the MLP branch, by g)."""
        with attention_backends(xs.device):
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(xs),
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **attend,
            )
        h = xs + attn_out
        return h, self.mlp(self.post_attention_layernorm(h))

    def _stage_and_mask(self, attention_mask, sel: Selection, cache, plan: RoutingPlan, length: int, uniform: bool,
                        float_dtype):
        """Stage this step's key columns in the cache (protocol step 3a, pmod/cache.py; the attention's ``update``
        commits them) and build the attention mask of the gathered queries over every key held after that update."""
        query_columns = sel.positions if isinstance(plan.past_length, int) and plan.past_length == 0 else (
            sel.positions + plan.past_length)  # (B, S) logical column per slot
        columns = query_columns if sel.slot_valid is None else query_columns.masked_fill(~sel.slot_valid, -1)
        held_empty, first_new = False, 0
        if cache is not None:
            layer = cache.layers[self.pmod_spec.index]
            held_empty = layer.has_empty_slots
            columns, first_new = layer.stage(columns, length, full=uniform)  # (B, S_held), slot of the first new one
        width = sel.positions.shape[1]
        # Plain causal attention (mask None) is exact when every slot holds a token and the queries either
        # are all the keys (ascending positions) or are a single token that sees every held key.
        causal_ok = uniform and not held_empty and (columns.shape[1] == width or width == 1)
        mask = _subset_mask(attention_mask, sel.positions, query_columns, sel.slot_valid, columns, first_new, causal_ok,
                            True, float_dtype)
        return mask, columns

    def _dense_step_mask(self, attention_mask, cache, plan: RoutingPlan, batch: int, length: int,
                         device: torch.device, float_dtype):
        """`_stage_and_mask` for a dense step, in fewer operations (at batch 1 a GPU pays for each): the queries are
        the T new tokens in order (the model's mask rows as they are), every slot holds its token."""
        columns = plan.columns  # (B, T)
        if cache is None:
            return attention_mask, columns  # the keys are the queries: the model's own mask
        layer = cache.layers[self.pmod_spec.index]
        held, first_new = layer.stage(columns, length, full=True)  # (B, S_held)
        fast_path = not layer.has_empty_slots and (held.shape[1] == length or length == 1)
        mask = _subset_mask(attention_mask, None, columns, None, held, first_new, fast_path, layer.has_empty_slots,
                            float_dtype)
        return mask, held

    def _keep_layout(self, positions, slot_valid, held, attention_mask, cache, plan: RoutingPlan, length: int) -> None:
        """What `_maps_over_positions` needs to return this step's attention maps over sequence positions rather than
        the gathered slots: the queries' positions (None: the positions in order), their validity, the held keys'
        columns, T and the key width of the dense model's maps."""
        width = _logical_width(attention_mask, cache, self.pmod_spec, plan, length)
        self.self_attn._pmod_layout = (positions, slot_valid, held, length, width)

    def _record(self, plan: RoutingPlan, sel: Selection, logits: torch.Tensor) -> None:
        self.last_routing = LayerRouting(
            target=plan.target,
            router_logits=logits.detach() if logits.requires_grad else logits,
            keep_ratio=self.pmod_spec.keep_ratio,
            selection=sel,
        )


# On CUDA, sdpa's cuDNN backend builds a new execution plan for every new shape / mask (about 6 ms of host time
# each), and every routed layer has its own key length, new at every decoding step, so the plans never repeat
# (measured on an H200: a p-MoD decoding step 11x the dense one, 1.4x without cuDNN). Routed layers use the other
# backends; the rest of the model is left to PyTorch's choice.
_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The scaled-dot-product-attention backends a routed layer may use on ``device``: every one but cuDNN on CUDA,
    PyTorch's own choice elsewhere."""
    return sdpa_kernel(list(_SDPA_BACKENDS)) if device.type == "cuda" else contextlib.nullcontext()


def _logical_width(attention_mask, cache, spec: RoutedLayerSpec, plan: RoutingPlan, length: int) -> int:
    """The key width of the dense model's attention maps for this step: past + T, or a static cache's length."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.shape[-1]
    if isinstance(plan.past_length, int):
        return plan.past_length + length
    return cache.layers[spec.index].max_cache_len


def _maps_over_positions(module: nn.Module, args, output):
    """Forward hook of a routed layer's attention (registered first): its attention weights cover the gathered slots
    and held keys, (B, H, S, S_kv); with ``output_attentions`` they are returned over sequence positions and logical
    key columns, (B, H, T, past + T), as the dense model's, zero where a token was not processed or a key not held."""
    layout = module.__dict__.pop("_pmod_layout", None)
    if layout is None or not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
        return None
    positions, slot_valid, kv_columns, length, width = layout
    weights = output[1]  # (B, H, S, S_kv)
    batch, heads, slots, keys = weights.shape
    weights = weights * (kv_columns >= 0)[:, None, None, :].to(weights.dtype)  # empty key slots hold nothing
    if slot_valid is not None:
        weights = weights * slot_valid[:, None, :, None].to(weights.dtype)  # an empty query slot is no token's row
    columns = kv_columns.clamp(min=0)[:, None, None, :].expand(batch, heads, slots, keys)
    rows = weights.new_zeros(batch, heads, slots, width).scatter_add_(3, columns, weights)  # (B, H, S, width)
    if positions is None:  # a dense step: the slots are the positions
        return (output[0], rows, *output[2:])
    maps = weights.new_zeros(batch, heads, length, width)
    maps.scatter_(2, positions[:, None, :, None].expand(batch, heads, slots, width), rows)  # (B, H, T, width)
    return (output[0], maps, *output[2:])


def _check_weight_range(spec: RoutedLayerSpec, dtype: torch.dtype) -> None:
    """TanhNorm's weights |g| <= |alpha| + |beta| must be finite in the dtype the layer runs in: settings finite in
    Python (alpha=1e39 on float32, 1e5 on float16) would otherwise turn every output into inf / NaN. Plain Python
    (a compiled forward folds it away)."""
    bound = abs(spec.alpha) + abs(spec.beta)
    if dtype.is_floating_point and not bound < torch.finfo(dtype).max:
        raise PModConfigError(
            f"p-MoD layer {spec.index}: alpha={spec.alpha:g} and beta={spec.beta:g} give router weights up to "
            f"{bound:g}, beyond what {dtype} holds ({torch.finfo(dtype).max:g}); the outputs would be inf or NaN. Use "
            "settings within range (the paper's are alpha=0.2, beta=1)."
        )


def _check_cache(cache) -> PModCache | PModStaticCache:
    if not isinstance(cache, (PModCache, PModStaticCache)):
        raise PModInputError(
            f"p-MoD layers need a pmod.PModCache, got a {type(cache).__name__}: a routed layer caches only the tokens "
            "it processed. Call the top-level p-MoD model without a cache (it creates one) or pass "
            "pmod.PModCache(num_layers) or pmod.PModStaticCache.for_model(model, max_cache_len)."
        )
    return cache


class _Rows:
    """Reads and writes the rows ``pos`` (B, S) of (B, T, ...) tensors: along the sequence dimension at batch 1
    (``row_start`` None: one kernel each), through flat row indices otherwise (one index per token, not per element:
    index_select / index_copy_ are markedly faster than gather / scatter over an expanded index on long sequences)."""

    def __init__(self, pos: torch.Tensor, row_start: torch.Tensor | None) -> None:
        self.pos = pos
        self.by_sequence = row_start is None
        self.index = pos[0] if self.by_sequence else (pos + row_start).flatten()  # (S,) or (B*S,)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B, T) or (B, T, ...) at the rows: (B, S) or (B, S, ...). A (1, T, ...) ``t`` beside a larger batch is
        shared by its rows (rotary tables, position ids without padding): indexed once per row of ``pos``."""
        if self.by_sequence:
            return t.index_select(1, self.index)
        if t.shape[0] == 1:
            return t[0].index_select(0, self.pos.flatten()).view(*self.pos.shape, *t.shape[2:])
        return t.flatten(0, 1).index_select(0, self.index).view(*self.pos.shape, *t.shape[2:])

    def put(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (B, S, ...) into the rows of the contiguous ``out`` (B, T, ...), in place."""
        if self.by_sequence:
            out.index_copy_(1, self.index, values)
        else:
            out.view(-1, *out.shape[2:]).index_copy_(0, self.index, values.flatten(0, 1))


def _rotary_rows(position_embeddings: tuple[torch.Tensor, torch.Tensor], plan: RoutingPlan,
                 rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rows`` of the rotary tables ``(cos, sin)``, each (1 | B, T, d), as two (B, S, d): one gather of
    ``cat([cos, sin])``, concatenated once per forward for the layers that share the tables (the plan keeps them)."""
    cos, sin = position_embeddings
    both = next((joined for table, joined in plan.rotary if table is cos), None)
    if both is None:  # the first layer with these tables (Gemma 3 has one pair per layer type)
        both = torch.cat([cos, sin], dim=-1)  # (1 | B, T, 2d)
        plan.rotary.append((cos, both))
    dim = cos.shape[-1]
    picked = rows.take(both)  # (B, S, 2d)
    return picked[..., :dim], picked[..., dim:]


def _position_rows(position_ids: torch.Tensor | None, rows: _Rows) -> torch.Tensor | None:
    """The position ids (1 | B, T) at the ``rows``, as (B, S)."""
    return None if position_ids is None else rows.take(position_ids)


def _subset_mask(
    mask: torch.Tensor | None,
    rows: torch.Tensor | None,
    query_columns: torch.Tensor,
    slot_valid: torch.Tensor | None,
    kv_columns: torch.Tensor,
    first_new: int | torch.Tensor,
    fast_path: bool,
    empty_keys: bool,
    float_dtype: torch.dtype | None,
) -> torch.Tensor | None:
    """Attention mask of the gathered queries (B, S) over the held keys (B, S_kv).

    ``mask`` is the model's mask over logical positions: (B or 1, 1, q, past + q) bool or additive float,
    or None for plain causal attention. ``rows`` (B, S): the queries' rows of ``mask`` (their sequence positions), or
    None when the queries are its rows in order (a dense step). ``query_columns`` (B, S): their logical columns. The
    queries' own entries are key slots ``first_new + j``. Empty query slots (``slot_valid`` False; None: there are none)
    attend only to themselves so no row is fully masked; empty key slots (``empty_keys``: there may be some) are
    masked for every query.
    """
    batch, width = query_columns.shape
    if mask is None and fast_path:
        return None  # kept positions are ascending, so plain causal attention over the slots is exact
    if mask is None:
        allowed = kv_columns[:, None, :] <= query_columns[:, :, None]  # (B, S, S_kv)
    else:
        if mask.dim() != 4:
            raise PModInputError(f"Expected a 4-D attention mask from the model, got shape {tuple(mask.shape)}.")
        full = mask[:, 0].expand(batch, -1, -1)  # (B, q, past + q)
        if rows is not None:
            full = full.gather(1, rows[..., None].expand(batch, width, full.shape[-1]))  # (B, S, past + q)
        cols = kv_columns.clamp(min=0)[:, None, :].expand(batch, width, kv_columns.shape[1])
        picked = full.gather(2, cols)  # (B, S, S_kv)
        allowed = picked if picked.dtype == torch.bool else picked == 0
        float_dtype = None if mask.dtype == torch.bool else mask.dtype
    if empty_keys:
        allowed = allowed & (kv_columns >= 0)[:, None, :]
    if slot_valid is not None:
        # Empty query slot j is key slot (first_new + j): let it see itself only.
        slots = torch.arange(kv_columns.shape[1], device=allowed.device)
        eye = slots[None, :] == (first_new + torch.arange(width, device=allowed.device))[:, None]  # (S, S_kv)
        allowed = allowed | (eye[None] & ~slot_valid[:, :, None])
    allowed = allowed[:, None]  # (B, 1, S, S_kv)
    if float_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=float_dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(float_dtype).min
    )


def convert_decoder_layer(layer: nn.Module, spec: RoutedLayerSpec) -> nn.Module:
    """Make ``layer`` the routed p-MoD layer ``spec`` in place (its class becomes its routed class) and return it."""
    if not isinstance(layer, PModLayerMixin):
        routed = ROUTED_LAYERS.get(type(layer))
        if routed is None:
            raise UnsupportedModelError(
                f"p-MoD has no routed version of the decoder layer {type(layer).__name__}; it routes "
                f"{', '.join(sorted(c.__name__ for c in ROUTED_LAYERS))}."
            )
        layer.__class__ = routed
    ref = layer.input_layernorm.weight
    # under DeepSpeed ZeRO-3 the weight is a partitioned, empty placeholder: its full shape is ds_shape
    hidden = tuple(getattr(ref, "ds_shape", ref.shape))[-1]
    if isinstance(getattr(layer, "router", None), nn.Linear) and not isinstance(layer.router, Router):
        layer.router.__class__ = Router  # same parameters, fp32 forward
    if not hasattr(layer, "router") or not isinstance(layer.router, nn.Linear):
        layer.router = Router(hidden, 1, bias=spec.router_bias, device=ref.device, dtype=ref.dtype)
        if spec.router_zero_init:
            zero_router(layer.router)
    layer.pmod_spec = spec
    layer.last_routing = None
    if not getattr(layer.self_attn, "_pmod_maps_hook", False):
        layer.self_attn.register_forward_hook(_maps_over_positions, prepend=True)
        layer.self_attn._pmod_maps_hook = True
    return layer


class Router(nn.Linear):
    """The router ``s = w . x + b``, computed in fp32 (bf16 scores tie too often to rank by).

    A module call rather than a read of ``weight``, so DeepSpeed ZeRO-3 gathers the partitioned parameters
    before use. Parameter names are those of ``nn.Linear`` (``router.weight``, ``router.bias``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        if torch.is_autocast_enabled(x.device.type):  # autocast would run the product in bf16 / fp16 all the same
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), self.weight.float(), bias)
        return F.linear(x.float(), self.weight.float(), bias)


def zero_router(router: nn.Linear) -> None:
    with torch.no_grad():
        router.weight.zero_()
        if router.bias is not None:
            router.bias.zero_()
