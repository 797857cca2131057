"""The forward hook that runs a transformers causal LM through dynaflow (the only module importing transformers).

How a step runs. ``generate`` calls ``model(**inputs)`` for the prefill and for every decode step. The hook
checks the call (a static cache of this batch, no unsupported options), initialises a fresh static cache
eagerly (so Dynamo sees its tensors as graph inputs rather than allocations inside the graph; its KV shapes
are the ones the model's own first update would give, probed once on fake tensors), marks the batch
dim of every cache tensor dynamic (so it shares the batch symbol of ``input_ids``), and calls a
``dynaflow.compile``-d step function that returns the logits. The cache object itself never leaves the
graph as an output: its tensors are mutated in place — ``keys.index_copy_(2, pos, k)`` on a nano-batch *view*
of rows ``[a, b)`` of the cache, and the batch-free length counter once per step (a barrier) — and the hook
hands the same cache object back in the output, as transformers does.

Prefill (sequence = prompt length) and decode (sequence 1) are different graphs; Dynamo captures each once,
and dynaflow partitions and plans each for its batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Iterator

import torch
import transformers
from transformers.cache_utils import Cache, StaticCache, StaticLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

import dynaflow
from dynaflow.errors import CaptureError, ConfigError
from dynaflow.integrations.transformers import _experts

__all__ = ["DynaflowForward", "enable"]

log = logging.getLogger("dynaflow.integrations.transformers")

SUPPORTED_KWARGS = ("input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                    "return_dict", "logits_to_keep", "output_attentions", "output_hidden_states")
"""The forward arguments the hook understands; any other argument given a value is refused."""
_SUPPORTED = frozenset(SUPPORTED_KWARGS)
"""The same, as a set: one subset test per call."""

OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The cache's field in ``CausalLMOutputWithPast``: ``cache`` in recent transformers 5.x, ``past_key_values``
before (5.17, the GPU machine's version)."""


def cache_parameter(model: torch.nn.Module) -> str:
    """The name of ``model.forward``'s cache argument (``cache``, or ``past_key_values`` in older 5.x), read off
    the signature: passing the other name lands in ``**kwargs`` and the model runs without its cache."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class DynaflowForward:
    """Installed as ``model.forward`` (on the instance): runs each call through a :class:`dynaflow.Compiled`.

    ``compiled`` is the dynaflow object (``.explain()``, ``.graphs``, ``.last_timeline``); ``calls`` counts
    the forwards it ran.
    """

    _dynaflow_hook = True

    def __init__(self, model: torch.nn.Module, options: dict[str, Any], row_wise_experts: bool = True):
        self.model = model
        self.options = dict(options)
        self.row_wise_experts = row_wise_experts
        self._own_forward = type(model).forward.__get__(model)
        # generate() reads the forward's signature to decide what to pass (position_ids for left padding,
        # logits_to_keep): the hook must advertise the model's own parameters, not (*args, **kwargs).
        self.__signature__ = inspect.signature(self._own_forward)
        self._cache_arg = cache_parameter(model)
        self._saved_disable_compile = getattr(model.generation_config, "disable_compile", False)
        self.compiled = dynaflow.compile(self._step, **options)
        self.compiled.watch_hooks(model)  # the step runs this model: its hooks are watched, not guarded per module
        self.calls = 0
        self._prepared: tuple[Any, int, tuple[Any, ...]] | None = None
        """(cache, batch, its layers' tensors) of the last prepared cache (see ``_prepare_cache``)."""
        self._kv_dims: list[tuple[int, int, int]] | None = None
        """Per cache layer (KV heads, key head dim, value head dim), probed once (see ``_probe_kv_dims``)."""

    # -- the captured step -------------------------------------------------------------------------------
    def _step(self, input_ids: torch.Tensor, attention_mask: Any, position_ids: Any, cache: Any,
              logits_to_keep: int = 0) -> torch.Tensor:
        out = self._own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=cache is not None, return_dict=True, logits_to_keep=logits_to_keep,
                                **{self._cache_arg: cache})
        return out.logits

    # -- the hook ----------------------------------------------------------------------------------------
    @torch._dynamo.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Never traced by an outer torch.compile (generate's auto-compile, a user's torch.compile(model)): the
        # outer graph breaks here and dynaflow's own capture runs the step.
        call = self._bind(args, kwargs)
        ids = call["input_ids"]
        cache = call["cache"]
        if cache is not None:
            self._prepare_cache(cache, ids)
        keep = call["logits_to_keep"]
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            raise ConfigError(f"logits_to_keep must be an int >= 0 under dynaflow; got {keep!r}.")
        logits = self.compiled(ids, call["attention_mask"], call["position_ids"], cache, keep)
        self.calls += 1
        if call["return_dict"] is False:
            return (logits, cache) if cache is not None else (logits,)
        return CausalLMOutputWithPast(logits=logits, **{OUTPUT_CACHE_FIELD: cache})

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > 1:
            raise ConfigError(
                f"dynaflow's transformers forward takes input_ids as its only positional argument; got {len(args)} "
                f"positional arguments. Pass the others by keyword (attention_mask=..., {self._cache_arg}=...)."
            )
        call = dict(kwargs)
        if args:
            if "input_ids" in call:
                raise ConfigError("input_ids was given both positionally and by keyword.")
            call["input_ids"] = args[0]
        unknown = () if _SUPPORTED.issuperset(call) else sorted(
            k for k, v in call.items() if k not in _SUPPORTED and v is not None)
        if unknown:
            raise ConfigError(
                f"dynaflow runs this model's forward with {', '.join(SUPPORTED_KWARGS[:7])}; it got unsupported "
                f"argument(s) {unknown}. Drop them, or call dynaflow.integrations.transformers.disable(model) "
                "for calls that need them (e.g. labels for a loss, inputs_embeds)."
            )
        for flag in ("output_attentions", "output_hidden_states"):
            if call.get(flag):
                raise ConfigError(f"{flag}=True is not supported under dynaflow (only logits are returned); "
                                  f"pass {flag}=False or disable dynaflow for this call.")
        if "cache" in call and "past_key_values" in call and call["past_key_values"] is not None:
            raise ConfigError(f"Pass the cache once, as {self._cache_arg}=... (cache and past_key_values name the "
                              "same argument).")
        cache = call.get("cache", call.get("past_key_values"))
        ids = call.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ConfigError(
                f"input_ids must be a [batch, seq] tensor of token ids; got {shape}. dynaflow's transformers "
                "integration splits the batch of input_ids (inputs_embeds is not supported)."
            )
        use_cache = call.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        if cache is None and use_cache:
            raise ConfigError(
                f"model(...) was called with use_cache={use_cache} and no cache (input_ids {tuple(ids.shape)}), so "
                "transformers would create a DynamicCache, which dynaflow cannot split in place. Use "
                f"model.generate(..., cache_implementation='static'), pass {self._cache_arg}=StaticCache("
                "config=model.config, max_cache_len=N), or call the model with use_cache=False."
            )
        if cache is not None and not use_cache:
            cache = None
        return {"input_ids": ids, "attention_mask": call.get("attention_mask"),
                "position_ids": call.get("position_ids"), "cache": cache,
                "return_dict": call.get("return_dict"),
                "logits_to_keep": 0 if call.get("logits_to_keep") is None else call["logits_to_keep"]}

    def _prepare_cache(self, cache: Any, ids: torch.Tensor) -> None:
        """Check the cache is a static one of this batch; allocate it now if it is still lazy. Done once per
        (cache, batch, layer tensors): a decode loop passes the same cache every step."""
        batch = int(ids.shape[0])
        prepared = self._prepared
        if (prepared is not None and prepared[0] is cache and prepared[1] == batch
                and len(prepared[2]) == len(cache.layers)
                and all(l.keys is k and l.values is v for l, (k, v) in zip(cache.layers, prepared[2]))):
            return
        _check_static(cache, self.model.config)
        layers = list(cache.layers)
        if not all(layer.is_initialized for layer in layers):
            if self._kv_dims is None:
                self._kv_dims = self._probe_kv_dims(len(layers))
            dtype = next(self.model.parameters()).dtype
            for layer, (heads, k_dim, v_dim) in zip(layers, self._kv_dims):
                if not layer.is_initialized:  # what the layer's first update would allocate (no rows yet)
                    layer.lazy_initialization(torch.zeros(batch, heads, 0, k_dim, dtype=dtype, device=ids.device),
                                              torch.zeros(batch, heads, 0, v_dim, dtype=dtype, device=ids.device))
        for i, layer in enumerate(layers):
            rows = int(layer.keys.shape[0])
            if rows != batch:
                raise ConfigError(
                    f"The static cache holds {rows} rows (layer {i} keys {tuple(layer.keys.shape)} = [max_batch_size, "
                    f"heads, max_cache_len, head_dim]) but input_ids has batch {batch} {tuple(ids.shape)}. dynaflow "
                    "splits the cache rows with the batch, so they must match: create the StaticCache for this batch "
                    "(generate(..., cache_implementation='static') does), or pad/trim the batch to "
                    f"{rows} prompts."
                )
        if batch >= 2:
            for layer in layers:
                torch._dynamo.mark_dynamic(layer.keys, 0)
                torch._dynamo.mark_dynamic(layer.values, 0)
        self._prepared = (cache, batch, tuple((layer.keys, layer.values) for layer in layers))

    def _probe_kv_dims(self, num_layers: int) -> list[tuple[int, int, int]]:
        """Each cache layer's (KV heads, key head dim, value head dim) as the model's own first update makes them:
        one decode step of the model on fake tensors (no memory, no data) into a fresh lazy cache. The config
        cannot say it for every family (Falcon's multi-query attention keeps one KV head whatever
        ``num_attention_heads`` is). Layers the probe does not reach (an op without a fake kernel) take the
        reached layers' dims when those agree, else the config's."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        cfg = self.model.config.get_text_config(decoder=True)
        probe = StaticCache(config=cfg, max_cache_len=2)
        device = next(self.model.parameters()).device
        quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a meta kernel's failure as an error
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            with _tensors_restored(self.model), FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                self._own_forward(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                                  use_cache=True, return_dict=True, **{self._cache_arg: probe})
        except Exception as exc:  # noqa: BLE001 - a probe: what it reached is used, the rest falls back below
            log.debug("the KV-shape probe of %s stopped early: %s", type(self.model).__name__, exc)
        finally:
            quiet.setLevel(level)
        dims = [(int(l.keys.shape[1]), int(l.keys.shape[-1]), int(l.values.shape[-1]))
                for l in probe.layers[:num_layers] if l.is_initialized]
        if len(dims) < num_layers:
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            fill = dims[0] if dims and len(set(dims)) == 1 else (heads, head_dim, head_dim)
            dims += [fill] * (num_layers - len(dims))
        return dims

    # -- lifecycle ---------------------------------------------------------------------------------------
    def install(self) -> "DynaflowForward":
        if self.row_wise_experts:
            _experts.wrap(self.model)
        self.model.forward = self
        self.model.generation_config.disable_compile = True
        return self

    def remove(self) -> None:
        if self.model.__dict__.get("forward") is self:
            del self.model.forward
        _experts.unwrap(self.model)
        self.model.generation_config.disable_compile = self._saved_disable_compile

    def explain(self) -> str:
        return self.compiled.explain()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"DynaflowForward({type(self.model).__name__}, {opts}, graphs={len(self.compiled.graphs)}, "
                f"calls={self.calls})")


@contextlib.contextmanager
def _tensors_restored(model: torch.nn.Module) -> Iterator[None]:
    """Put back every tensor a module holds (parameters, buffers, plain attributes) when the block ends: a
    forward on fake tensors must not leave one behind (a rotary module caching its ``inv_freq``)."""
    held = [(d, dict(d)) for m in model.modules() for d in (m._parameters, m._buffers, m.__dict__)]
    try:
        yield
    finally:
        for d, before in held:
            for key in [k for k, v in d.items() if isinstance(v, torch.Tensor) and before.get(k) is not v]:
                if key in before:
                    d[key] = before[key]
                else:
                    del d[key]


def _check_static(cache: Any, config: Any) -> None:
    if not isinstance(cache, Cache):
        raise ConfigError(f"cache must be a transformers StaticCache; got {type(cache).__name__}.")
    bad = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if isinstance(cache, StaticCache) and bad and all("Sliding" in name for name in bad):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        setting = ", ".join(f"{k}={getattr(text, k)!r}" for k in ("sliding_window", "layer_types")
                            if getattr(text, k, None) is not None)
        fix = ("build the model from a config without a sliding window (sliding_window=None, every layer_types "
               "entry 'full_attention') where full attention suits it, or run it without dynaflow") if setting else (
               "the model's own config has no sliding window: build the cache from it, "
               "StaticCache(config=model.config, max_cache_len=N), or generate(..., cache_implementation='static')")
        raise ConfigError(
            f"cache=StaticCache has sliding-window layers ({', '.join(bad)})"
            + (f", from the model's config ({setting})" if setting else "") + ": dynaflow splits a static cache of "
            "full-attention StaticLayer layers only (a sliding layer's ring buffer is not a view of each nano-batch's "
            f"rows). Fix: {fix}."
        )
    if not isinstance(cache, StaticCache) or bad:
        raise ConfigError(
            f"cache={type(cache).__name__} (layers: {', '.join(bad) or 'static'}): dynaflow needs a StaticCache of "
            "full-attention StaticLayer layers, whose batch-major [batch, heads, max_len, head_dim] tensors each "
            "nano-batch updates in place through a view of its rows. Fix: generate(..., cache_implementation="
            "'static') or pass cache=StaticCache(config=model.config, max_cache_len=N). Dynamic, sliding-window "
            "and quantized caches are not supported."
        )
    if getattr(cache, "offloading", False):
        raise ConfigError("An offloaded StaticCache is not supported by dynaflow; create it with offloading=False.")


def enable(model: Any, row_wise_experts: bool = True, **options: Any) -> DynaflowForward:
    if not isinstance(model, transformers.PreTrainedModel) or not hasattr(model, "generate"):
        raise ConfigError(
            f"dynaflow.integrations.transformers.enable(model) needs a transformers PreTrainedModel with generate(); "
            f"got {type(model).__name__}. For other modules use dynaflow.compile(model)."
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model; dynaflow's transformers integration "
                          "supports decoder-only causal LMs.")
    old = model.__dict__.get("forward")
    if getattr(old, "_dynaflow_hook", False):
        old.remove()
    elif old is not None:
        raise CaptureError(
            f"{type(model).__name__}.forward is already overridden on this instance ({old!r}); dynaflow would "
            "replace it. Remove that override first."
        )
    options = {k: v for k, v in options.items() if v is not None or k == "nano_batches"}
    hook = DynaflowForward(model, options, row_wise_experts).install()
    log.info("dynaflow enabled on %s: %r", type(model).__name__, hook)
    return hook
