"""transformers ``generate`` through dynaflow: greedy tokens equal eager, static KV cache split in place.

    python examples/03_transformers_generate.py
"""

import torch

from dynaflow.integrations import transformers as df_hf
from dynaflow.models import llama_from_config

if not df_hf.is_available():
    raise SystemExit("this example needs transformers >= 5.0: pip install 'transformers>=5'")

torch.manual_seed(0)
model = llama_from_config(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128)

ids = torch.randint(1, 128, (4, 7))
mask = torch.ones_like(ids)
ids[1, :2], mask[1, :2] = 0, 0  # a left-padded, shorter prompt
kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")

with torch.no_grad():
    ref = model.generate(ids, **kw)
    hook = df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="thread")
    out = model.generate(ids, **kw)
    df_hf.disable(model)

assert torch.equal(out, ref), (out, ref)
print(f"{hook.calls} forward steps through dynaflow, {len(hook.compiled.graphs)} graphs (prefill, decode)")
print(hook.explain())
