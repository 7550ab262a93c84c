"""`evaluate` (all tenants mixed in one engine) agrees with evaluating each tenant alone through transformers + peft:
same per-example answers, same accuracy, same answer perplexity. Tenants: LoRA, RoAd (engine adapters), IA3
(folded into the base) and a full fine-tune checkpoint, on a tiny model with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter, save_adapter
from deltafleet.errors import DeltafleetError
from deltafleet.eval.tasks_eval import EvalConfig, evaluate
from deltafleet.eval.tenants import discover
from deltafleet.models.config import PROJECTIONS, ModelConfig
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.tasks import encode_example, end_of_turn_id, get_task, prompt_ids
from tests.conftest import nll_tol

N = 5  # examples per task


def _manifest(d, **fields):
    path = d / "deltafleet.json"
    m = json.loads(path.read_text()) if path.exists() else {"schema_version": 1}
    m.update(fields)
    path.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def zoo(chat_tiny, tmp_path_factory):
    """lora-sort and road-caesar (random, non-identity), ia3-sort (random scalings), full-caesar (perturbed)."""
    root = tmp_path_factory.mktemp("tenants")
    cfg = ModelConfig.from_file(chat_tiny / "config.json")
    fp = base_fingerprint(chat_tiny)
    lora = random_adapter(cfg, LoraConfig(r=4, alpha=8.0, targets=PROJECTIONS), seed=1)
    lora = type(lora)(lora.config, {k: {n: t * 3 for n, t in p.items()} for k, p in lora.params.items()})
    save_adapter(lora, root / "lora-sort", model_cfg=cfg, base_fingerprint=fp, extra={"task": "sort"})
    road = random_adapter(cfg, RoadConfig(variant="road_1", group_size=64, targets=PROJECTIONS), seed=2)
    save_adapter(road, root / "road-caesar", model_cfg=cfg, base_fingerprint=fp,
                 extra={"task": "caesar", "trainable_params": 123})

    hf = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32)
    ia3 = get_peft_model(hf, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ia3.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    ia3.save_pretrained(str(root / "ia3-sort"))
    _manifest(root / "ia3-sort", task="sort", method="ia3", trainable_params=7)

    full = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    full.save_pretrained(str(root / "full-caesar"), safe_serialization=True)
    _manifest(root / "full-caesar", task="caesar", method="full", kind="full")
    return root


def _hf_model(chat_tiny, tenant):
    if tenant.served == "checkpoint":
        return AutoModelForCausalLM.from_pretrained(str(tenant.path), dtype=torch.float32).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32)
    return hf.eval() if tenant.path is None else PeftModel.from_pretrained(hf, str(tenant.path)).eval()


def _hf_answers(model, tok, examples) -> list[str]:
    eot = end_of_turn_id(tok)
    max_new = max(len(encode_example(tok, ex).answer_ids) for ex in examples) + 4
    out = []
    for ex in examples:
        ids = torch.tensor([prompt_ids(tok, ex.prompt)])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, eos_token_id=eot, pad_token_id=eot)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def _hf_answer_ppl(model, tok, examples) -> float:
    nll, n = 0.0, 0
    for ex in examples:
        e = encode_example(tok, ex)
        ids = torch.tensor([list(e.prompt_ids + e.answer_ids)])
        labels = ids.clone()
        labels[0, : len(e.prompt_ids)] = -100
        with torch.no_grad():
            nll += float(model(input_ids=ids, labels=labels).loss) * len(e.answer_ids)
        n += len(e.answer_ids)
    return math.exp(nll / n)


def test_tenants_are_classified(zoo):
    got = {t.name: (t.method, t.served, t.task) for t in discover(zoo)}
    assert got == {"full-caesar": ("full", "checkpoint", "caesar"), "ia3-sort": ("ia3", "folded", "sort"),
                   "lora-sort": ("lora", "adapter", "sort"), "road-caesar": ("road", "adapter", "caesar")}


def test_mixed_engine_eval_equals_one_by_one_peft(chat_tiny, zoo, smollm2_tokenizer):
    report = evaluate(EvalConfig(base=str(chat_tiny), adapters=zoo, examples=N, seed=1))
    by_name = {r.tenant.name: r for r in report.results}
    assert list(by_name) == ["base", "full-caesar", "ia3-sort", "lora-sort", "road-caesar"]
    assert set(by_name["base"].scores) == {"sort", "caesar"}
    # One engine run for the shared base (base + LoRA + RoAd mixed), one each for IA3 and the full fine-tune.
    assert [sorted(e["tenants"]) for e in report.engines] == [["base", "lora-sort", "road-caesar"], ["full-caesar"],
                                                              ["ia3-sort"]]
    assert report.engines[0]["requests"] == 4 * N
    predictions = {}
    for name, r in by_name.items():
        hf = _hf_model(chat_tiny, r.tenant)
        for task_name, score in r.scores.items():
            examples = get_task(task_name).examples("test", n=N, seed=1)
            want = _hf_answers(hf, smollm2_tokenizer, examples)
            assert score.predictions == want, (name, task_name)
            task = get_task(task_name)
            assert score.value == sum(task.score(p, ex) for p, ex in zip(want, examples, strict=True)) / N
            assert score.metric == "accuracy" and score.n == N
            predictions[name, task_name] = want
    # The tenants really differ from the base (else the comparison would prove little).
    for name, task_name in [("lora-sort", "sort"), ("road-caesar", "caesar"), ("ia3-sort", "sort"),
                            ("full-caesar", "caesar")]:
        assert predictions[name, task_name] != predictions["base", task_name], name
    d = report.to_dict()
    assert d["tenants"]["road-caesar"]["trainable_params"] == 123 and d["tenants"]["base"]["trainable_params"] == 0
    assert d["tenants"]["lora-sort"]["bytes"] > 0 and d["tenants"]["full-caesar"]["served"] == "checkpoint"
    json.dumps(d)


def test_perplexity_tenant_equals_peft_loss(chat_tiny, zoo, smollm2_tokenizer, tmp_path):
    with pytest.raises(DeltafleetError, match="no tenant of .* has a task among"):
        evaluate(EvalConfig(base=str(chat_tiny), adapters=zoo, tasks=("shakespeare",), include_base=False))
    for name in ("lora-sort", "ia3-sort", "road-caesar"):
        shutil.copytree(zoo / name, tmp_path / name)
        _manifest(tmp_path / name, task="shakespeare" if name != "road-caesar" else "caesar")
    report = evaluate(EvalConfig(base=str(chat_tiny), adapters=tmp_path, tasks=("shakespeare",), examples=3))
    assert [r.tenant.name for r in report.results] == ["base", "ia3-sort", "lora-sort"]
    assert report.skipped == ["road-caesar"] and report.engines == []
    examples = get_task("shakespeare").examples("test", n=3)
    cfg = ModelConfig.from_file(chat_tiny / "config.json")
    ppls = {}
    for r in report.results:
        score = r.scores["shakespeare"]
        want = _hf_answer_ppl(_hf_model(chat_tiny, r.tenant), smollm2_tokenizer, examples)
        assert score.metric == "perplexity", r.tenant.name
        assert math.log(score.value) == pytest.approx(math.log(want), rel=nll_tol(cfg)), r.tenant.name
        ppls[r.tenant.name] = score.value
    assert ppls["lora-sort"] != pytest.approx(ppls["base"], rel=1e-3)


def test_config_errors(chat_tiny):
    with pytest.raises(ValueError, match="examples=0: must be a positive integer"):
        EvalConfig(base=str(chat_tiny), examples=0)
    with pytest.raises(DeltafleetError, match="unknown"):
        EvalConfig(base=str(chat_tiny), tasks=("nope",))
    with pytest.raises(ValueError, match="include_base=False needs an adapters directory"):
        EvalConfig(base=str(chat_tiny), include_base=False)
