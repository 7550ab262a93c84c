"""Usage: python results/compress/json-whole/serve_vs_merge.py ROOT. A whole SmolLM2 fine-tune (json-field, delta-come at 1/16, every byte counted) served by the engine in a mixed
batch vs its merge: greedy tokens and the logits of one forward (fp32)."""
import time, torch, sys
from pathlib import Path
from deltafleet.adapters import load_adapter
from deltafleet.adapters.serving import to_serving_form
from deltafleet.compress.merge import merged_model
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.serve.engine.backends import make_backend
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import POOL_CLASSES, pool_specs_for
from deltafleet.serve.engine.types import NO_ADAPTER
root = Path(sys.argv[1])  # holds json16: deltafleet compress --finetuned /tmp/ft-json --method delta-come --ratio 1/16 --out ROOT/json16
base, path = load_model("smollm2-135m", dtype=torch.float32)
tok = load_tokenizer(path)
merged, adapter, _ = merged_model("smollm2-135m", root / "json16")
prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
           for c in ('Extract the field "name" from {"name": "Ada", "age": 36}. Answer with the value only.',
                     "What is the capital of France?",
                     'Extract the field "city" from {"city": "Lyon", "zip": "69001"}. Answer with the value only.')]
t0 = time.perf_counter()
engine = Engine(base, tok, EngineConfig(dtype="float32", max_model_len=256, delta_slots=2, max_delta_rank=256), root)
reqs = [Request(p, SamplingParams(max_tokens=12), adapter=a) for p in prompts for a in ("json16", None)]
outs = engine.generate(reqs)
same = 0
for r, o in zip(reqs, outs):
    want = greedy_generate(merged if r.adapter else base, r.prompt_ids, 12)
    same += o.token_ids == want[:len(o.token_ids)]
    print(r.adapter, repr(tok.decode(o.token_ids)), o.token_ids == want[:len(o.token_ids)])
print(f"greedy equal to the merge / base: {same}/{len(reqs)}")
form = to_serving_form(adapter, torch.float32)
(spec,) = pool_specs_for([(form.family, form.width)])
pool = POOL_CLASSES[spec.family](spec, base.config, torch.float32)
pool.write(0, form)
T = 48
ids = torch.tensor([prompts[0][:T], prompts[2][:T]]) if min(len(p) for p in prompts) >= T else None
ids = torch.tensor([(prompts[0] * 3)[:T], (prompts[2] * 3)[:T]])
layout = BatchLayout.build([(pool, 0), (None, NO_ADAPTER)], T)
with torch.no_grad():
    got = base(ids, hook=layout.hook(make_backend("cpu")))
    want = merged(ids[:1])[0]
    print(f"logits served vs merged: max |diff| {float((got[0] - want).abs().max()):.3e} (max |logit| "
          f"{float(want.abs().max()):.1f}); base row unchanged: {bool(torch.equal(got[1], base(ids[1:])[0]))}")
print("table width in the pool:", pool.tensors[(-1, 'lm_head')]['A'].shape[1], "pool MB", pool.nbytes / 1e6)
