"""The transformers hook on a GPU: ``generate`` with a static cache through the cuda executor, eager streams
and ``cuda_graphs=True``, equals eager ``generate`` (float64, so a split GEMM's rounding cannot flip a greedy
token of the random model). Its CPU twin with torch.cuda faked is
``tests/test_integration_transformers.py::test_generate_on_the_cuda_executors_lowering_with_cuda_faked``."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["streams", "cuda-graphs"])
@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_generate_on_gpu_equals_eager(family, cuda_graphs):
    from dynaflow.integrations import transformers as df_hf

    torch._dynamo.reset()
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # multi-query attention: one KV head, which the hook's KV-shape probe must find on the device
        cfg = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                        multi_query=True, bos_token_id=1, eos_token_id=1)
        model = transformers.FalconForCausalLM(cfg)
    model = model.to("cuda", torch.float64).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 128, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        hook = df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="cuda",
                            config={"cuda_graphs": cuda_graphs})
        try:
            out = model.generate(ids, **kw)
        finally:
            df_hf.disable(model)
    torch.cuda.synchronize()
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    assert hook.calls == 6
