"""The zoo: plan validation, the energy profile on deltas of known rank, and a scaled-down build on the tiny model
that is resumable (finished entries are cached, a partial one resumes) and writes the energy files."""

from __future__ import annotations

import json

import pytest
import torch

from deltafleet.eval.zoo import ZooPlan, build, delta_energy, energy_profile, entry_status, scaled
from deltafleet.tasks.mixture import ALL_TASKS


def test_default_plan_shape():
    plan = ZooPlan()
    entries = plan.entries()
    names = [e.name for e in entries]
    assert len(plan.full_tasks) >= 3 and names[-1] == "broad-full" and entries[-1].task == ALL_TASKS
    for t in plan.tasks:
        assert {f"{t}-lora", f"{t}-road", f"{t}-ia3"} <= set(names)
    assert {e.task for e in entries if e.method == "full" and e.task != ALL_TASKS} == set(plan.full_tasks)
    assert entries[-1].steps > plan.full_steps
    assert 1.0 * 3600 < plan.estimated_seconds() < 2.5 * 3600
    assert dict(plan.lrs)["road"] >= 5 * dict(plan.lrs)["lora"]  # RoAd's rate: about 10x LoRA's (the paper)


def test_plan_errors():
    with pytest.raises(ValueError, match="at least 3 tasks"):
        ZooPlan(tasks=("addition", "multiplication", "sort"), full_tasks=("addition", "multiplication"))
    with pytest.raises(ValueError, match="lrs"):
        ZooPlan(lrs=(("lora", 0.0),))
    with pytest.raises(ValueError, match="must be a subset"):
        ZooPlan(tasks=("sort", "caesar", "addition"), full_tasks=("sort", "caesar", "json-field"))
    with pytest.raises(ValueError, match="shakespeare.*exact_match"):
        ZooPlan(tasks=("shakespeare",), full_tasks=())
    plan = scaled(ZooPlan(), tasks=["sort"], steps=3)
    assert [(e.name, e.steps) for e in plan.entries()] == [
        ("sort-lora", 3), ("sort-road", 3), ("sort-ia3", 3), ("sort-full", 3), ("broad-full", 6)]


def test_energy_of_known_rank():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 5, generator=g) @ torch.randn(5, 48, generator=g)  # rank 5
    e = delta_energy(low, ks=(4, 5, 128))
    assert e["top"][5] == pytest.approx(e["total"], rel=1e-9) and e["top"][4] < e["total"]
    assert e["top"][128] == pytest.approx(e["total"]) and e["rank_90"] <= 5
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 48, generator=g),
            "model.layers.1.self_attn.q_proj.weight": torch.randn(64, 48, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(48, 64, generator=g),
            "model.norm.weight": torch.ones(48)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.self_attn.q_proj.weight"] += low
    tuned["model.layers.1.self_attn.q_proj.weight"] += low
    tuned["model.layers.0.mlp.down_proj.weight"] += torch.randn(48, 64, generator=g)  # full rank
    prof = energy_profile(base, tuned, ks=(8, 32))
    assert set(prof) == {"q_proj", "down_proj", "all"}
    assert prof["q_proj"]["top8"] == pytest.approx(1.0) and prof["q_proj"]["layers"] == 2
    assert prof["down_proj"]["top8"] < 0.5 < prof["down_proj"]["top32"] < 1.0
    assert prof["down_proj"]["rank_90_median"] > 20 and prof["down_proj"]["rel_norm"] == pytest.approx(1.0, rel=0.2)
    assert prof["q_proj"]["top8"] > prof["all"]["top8"] > prof["down_proj"]["top8"]


def test_scaled_build_is_resumable_and_profiles_full_finetunes(chat_tiny, tmp_path):
    plan = scaled(ZooPlan(base=str(chat_tiny)), tasks=["sort"], steps=2, eval_examples=2, batch_size=2,
                  save_every=0, adapter_methods=("lora", "road"))
    out = tmp_path / "zoo"
    report = build(plan, out, show_progress=False)
    assert report.completed and set(report.statuses.values()) == {"trained"}
    assert sorted(report.statuses) == ["broad-full", "sort-full", "sort-lora", "sort-road"]
    broad = json.loads((out / "broad-full" / "deltafleet.json").read_text())
    assert broad["task"] == ALL_TASKS and broad["steps"] == 4 and broad["completed"]
    energy = json.loads((out / "energy.json").read_text())
    assert set(energy["profiles"]) == {"sort-full", "broad-full"}
    for prof in energy["profiles"].values():
        assert set(prof) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all"}
        for p in prof.values():
            assert 0 < p["top8"] <= p["top32"] <= p["top128"] <= 1 + 1e-9 and p["rel_norm"] > 0
    assert "| broad-full | all |" in (out / "energy.md").read_text()
    assert json.loads((out / "zoo.json").read_text())["plan"]["tasks"] == ["sort"]

    # Rerun: everything cached. Then lose one entry's export (as after a crash): only that entry resumes.
    assert set(build(plan, out, show_progress=False).statuses.values()) == {"cached"}
    (out / "sort-road" / "deltafleet.json").unlink()
    entry = next(e for e in plan.entries() if e.name == "sort-road")
    assert entry_status(out, entry) == "partial"
    report = build(plan, out, show_progress=False)
    assert report.statuses == {"sort-lora": "cached", "sort-road": "trained", "sort-full": "cached",
                               "broad-full": "cached"}
    assert entry_status(out, entry) == "done"
