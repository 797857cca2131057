"""A toy paged-KV serving engine built from torch alone: the shape of vLLM without vLLM.

Real engines do not install on the GPU test machine, so the tests need a stand-in that exercises what
dynaflow's engine integrations depend on, and nothing else:

* :mod:`toy_engine.context`: a **module-global forward context** (like ``vllm.forward_context``) holding the
  step's attention metadata, the KV caches and the per-nano-batch metadata builders;
* :mod:`toy_engine.ops`: the engine's opaque ops as ``torch.library`` custom ops with fake impls: a KV-cache
  write and a paged attention that read their metadata from the forward context, not their arguments, and
  an in-place rotary embedding that takes ``positions`` (a separate model input) and writes ``q``/``k``;
* :mod:`toy_engine.metadata`: **persistent metadata buffers** (``query_start_loc``, ``seq_lens``,
  ``block_table``, ``slot_mapping``) and the per-nano-batch builder that cuts them on the device;
* :mod:`toy_engine.model`: a tiny Llama decoder whose weights are copied from a ``transformers`` Llama;
* :mod:`toy_engine.scheduler`: continuous batching, chunked prefill under a token budget, mixed
  prefill+decode steps, a block allocator;
* :mod:`toy_engine.engine`: the step loop (fill the buffers, install the context, run the model, sample
  greedily), optionally replaying decode steps from an outer CUDA graph;
* :mod:`toy_engine.dynaflow_step`: the dynaflow hookup, done the way ``dynaflow.integrations.vllm`` does it.
"""
