"""Per-nano-batch attention metadata, built where vLLM builds it (the way its dual-batch overlap does).

vLLM's model runner turns the step's ``CommonAttentionMetadata`` into each backend's metadata (CPU, FlashAttention,
FlashInfer, ...) through ``AttentionGroup.build_metadata(common, ubatch_idx)``. :func:`install` wraps two of
``AttentionGroup``'s methods: ``create_metadata_builders`` asks for one builder per nano-batch more (builder
``1 + i`` serves nano-batch ``i``; builder 0 stays the engine's), and ``build_metadata`` remembers which group and
common metadata produced each backend metadata object. A nano-batch's metadata is then vLLM's own
``split_attn_metadata`` of the common metadata, built by that nano-batch's builder: no field-by-field slicing of
backend types, and no state shared between nano-batches.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable

import torch

from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.ubatch_utils import UBatchSlice, split_attn_metadata
from vllm.v1.worker.utils import AttentionGroup

from dynaflow.integrations._common import IntegrationError

log = logging.getLogger("dynaflow.integrations.vllm")

Slicer = Callable[[Any, slice, slice], Any]

_BUILT: "collections.OrderedDict[int, tuple[Any, AttentionGroup, CommonAttentionMetadata, int, dict]]" = (
    collections.OrderedDict())
"""Backend metadata built for the engine (builder 0), by id: (the object, its group, common metadata, prefix, kwargs)."""
_KEEP = 256
_EXTRA = {"builders": 0}


_SPLIT_BY_VLLM = ("query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
                  "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "seq_lens_cpu_upper_bound")
"""The fields ``split_attn_metadata`` cuts itself."""
_BY_REQUEST = ("encoder_seq_lens", "encoder_seq_lens_cpu", "dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound",
               "is_prefilling", "req_idx", "rswa_prefix_lens", "replayssm_decode_base_cpu")
"""Per-request fields that ``split_attn_metadata`` leaves out (Mamba builders assert ``is_prefilling``)."""
_BY_TOKEN = ("positions",)
"""Per-token fields it leaves out (encoder-only attention builds its slot mapping from ``positions``)."""
_CACHES = ("_num_computed_tokens_cache", "_token_to_req_indices_cache")
"""Derived per step; the cut metadata recomputes them."""
_WHOLE_STEP = ("logits_indices_padded", "num_logits_indices", "max_logits_per_req")
"""Fields that describe the whole step and have no per-nano-batch meaning (fast-prefill logits indices)."""
KNOWN_FIELDS = frozenset((*_SPLIT_BY_VLLM, *_BY_REQUEST, *_BY_TOKEN, *_CACHES, *_WHOLE_STEP, "causal",
                          "mm_req_doc_ranges"))
"""Every ``CommonAttentionMetadata`` field :func:`_slice_common` has a rule for (the contract test pins it)."""


def _slice_common(meta: CommonAttentionMetadata, requests_: slice, tokens: slice) -> CommonAttentionMetadata:
    """vLLM's ``split_attn_metadata`` of ``meta``, with every other field cut too: per request, per token, or
    refused when it only has a whole-step meaning. A field this version does not know fails closed."""
    cut = split_attn_metadata([UBatchSlice(requests_, tokens)], meta)[0]
    extra: dict[str, Any] = {}
    for f in dataclasses.fields(meta):
        value = getattr(meta, f.name)
        if value is None or value is getattr(cut, f.name) or f.name in _CACHES:
            continue
        if f.name in _BY_REQUEST:
            extra[f.name] = value[requests_]
        elif f.name in _BY_TOKEN:
            extra[f.name] = value[tokens]
        elif f.name == "causal":
            extra[f.name] = value[requests_] if isinstance(value, torch.Tensor) else value
        elif f.name == "mm_req_doc_ranges":
            first = requests_.start or 0
            extra[f.name] = {r - first: v for r, v in value.items() if requests_.start <= r < requests_.stop}
        elif f.name not in _SPLIT_BY_VLLM:
            raise IntegrationError(
                f"vLLM attention metadata field {f.name!r} is set ({type(value).__name__}) and dynaflow does not know "
                f"how to cut it into nano-batches ({_why(f.name)}). Run this model with nano_batches=1.")
    return dataclasses.replace(cut, **extra) if extra else cut


def _why(name: str) -> str:
    return ("it indexes the whole step's logits" if name in _WHOLE_STEP
            else "it is new in this vLLM version; dynaflow fails closed on fields it has no rule for")


SLICERS: dict[type, Slicer] = {CommonAttentionMetadata: _slice_common}
"""Metadata types cut directly (MRO lookup), for metadata that no ``AttentionGroup`` built (hand-built contexts);
extend with ``register_metadata_slicer``."""


def install(nano_builders: int) -> None:
    """Wrap ``AttentionGroup`` so each group gets ``nano_builders`` extra builders and remembers its builds
    (idempotent; a second call can only raise the count)."""
    _EXTRA["builders"] = max(_EXTRA["builders"], nano_builders)
    if getattr(AttentionGroup.build_metadata, "_dynaflow", False):
        return
    create, build = AttentionGroup.create_metadata_builders, AttentionGroup.build_metadata

    def create_metadata_builders(self: AttentionGroup, vllm_config: Any, device: Any, kernel_block_size: Any = None,
                                 num_metadata_builders: int = 1) -> Any:
        return create(self, vllm_config, device, kernel_block_size,
                      max(num_metadata_builders, 1 + _EXTRA["builders"]))

    def build_metadata(self: AttentionGroup, common_attn_metadata: CommonAttentionMetadata, ubatch_idx: int = 0,
                       common_prefix_len: int = 0, **kwargs: Any) -> Any:
        meta = build(self, common_attn_metadata, ubatch_idx, common_prefix_len, **kwargs)
        if ubatch_idx == 0 and meta is not None:
            _BUILT[id(meta)] = (meta, self, common_attn_metadata, common_prefix_len, kwargs)
            while len(_BUILT) > _KEEP:
                _BUILT.popitem(last=False)
        return meta

    for fn, orig in ((create_metadata_builders, create), (build_metadata, build)):
        fn._dynaflow = True  # type: ignore[attr-defined]
        fn.__wrapped__ = orig  # type: ignore[attr-defined]
        fn.__doc__ = orig.__doc__
    AttentionGroup.create_metadata_builders = create_metadata_builders  # type: ignore[method-assign]
    AttentionGroup.build_metadata = build_metadata  # type: ignore[method-assign]
    log.info("vLLM attention groups get %d builders for nano-batches", _EXTRA["builders"])


def common_of(meta: Any) -> CommonAttentionMetadata | None:
    """The common metadata vLLM built ``meta`` from this step, if an ``AttentionGroup`` built it."""
    if isinstance(meta, CommonAttentionMetadata):
        return meta
    rec = _BUILT.get(id(meta))
    return rec[2] if rec is not None and rec[0] is meta else None


def for_nano_batch(meta: Any, layer: str, nano: int, requests_: slice, tokens: slice) -> Any:
    """``meta`` for the requests/tokens of nano-batch ``nano``: rebuilt by that nano-batch's builder from the cut
    common metadata, or cut by a registered slicer."""
    rec = _BUILT.get(id(meta))
    if rec is not None and rec[0] is meta:
        _, group, common, prefix, kwargs = rec
        if 1 + nano >= len(group.metadata_builders):
            raise IntegrationError(
                f"nano-batch {nano} of layer {layer!r} has no attention metadata builder: the engine was set up "
                f"for {len(group.metadata_builders) - 1} nano-batches. Raise nano_batches in DYNAFLOW_VLLM_OPTIONS "
                "(it sizes the builders) or lower the strategy's nano-batch count.")
        # common_prefix_len (cascade attention) belongs to the whole step; vLLM builds its own ubatches with 0 too
        return group.build_metadata(_slice_common(common, requests_, tokens), 1 + nano, 0, **kwargs)
    for cls in type(meta).__mro__:
        fn = SLICERS.get(cls)
        if fn is not None:
            return fn(meta, requests_, tokens)
    raise IntegrationError(
        f"vLLM attention metadata of type {type(meta).__module__}.{type(meta).__qualname__} (layer {layer!r}) was not "
        "built by a vLLM AttentionGroup that dynaflow hooked, and has no nano-batch slicer. Turn the integration on "
        "before the engine starts (DYNAFLOW_VLLM=1), register a slicer with "
        "dynaflow.integrations.vllm.register_metadata_slicer(type, fn(metadata, request_slice, token_slice)), or run "
        "with nano_batches=1.")
