"""The real `deltafleet` CLI, run through typer's runner."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from deltafleet.adapters import LoraConfig, LowRankConfig, RoadConfig, random_adapter, save_adapter
from deltafleet.cli import app
from deltafleet.models.config import ModelConfig

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


COMMANDS = [[], ["info"], ["demo"], ["train"], ["tasks", "list"], ["eval"], ["eval", "ppl"], ["zoo", "build"],
            ["compress"], ["merge"], ["quantize"], ["lowbit-ppl"], ["serve"], ["serve-demo"], ["bench", "engine"],
            ["bench", "serve"], ["bench", "compress"], ["bench", "lowbit"], ["bench", "route"],
            ["bench", "cluster"], ["bench", "density"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "deltafleet")
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in _plain(result.output)


def test_info_lists_base_and_adapters(tiny_llama, tmp_path):
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    save_adapter(random_adapter(cfg, LoraConfig(r=4, targets=("q_proj", "v_proj"))), tmp_path / "tenant-a")
    save_adapter(random_adapter(cfg, RoadConfig(variant="road_2", group_size=32, targets=("o_proj",))),
                 tmp_path / "tenant-b")
    save_adapter(random_adapter(cfg, LowRankConfig(rank=3, targets=("down_proj",))), tmp_path / "tenant-c")
    (tmp_path / "broken").mkdir()
    result = runner.invoke(app, ["info", "--base", str(tiny_llama), "--adapters", str(tmp_path)],
                           env={"COLUMNS": "200"})
    out = _plain(result.output)
    assert result.exit_code == 0, out
    from transformers import AutoModelForCausalLM

    n_params = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).num_parameters()
    assert re.search(rf"parameters\s*│\s*{n_params:,}", out), out
    lora_bytes = 4 * 2 * (4 * 128 + 128 * 4 + 4 * 128 + 64 * 4)  # fp32, 2 layers, q (128 out) and v (64 out)
    assert re.search(rf"tenant-a\s*│\s*lora\s*│\s*r=4\s*│\s*q_proj,v_proj\s*│\s*2\s*│\s*{lora_bytes:,}", out), out
    assert re.search(r"tenant-b\s*│\s*road\s*│\s*road_2 g=32", out)
    assert re.search(r"tenant-c\s*│\s*lowrank\s*│\s*rank=3", out)
    assert re.search(r"broken\s*│\s*invalid", out)


def test_info_bad_base_exits_2():
    result = runner.invoke(app, ["info", "--base", "/no/such/dir"])
    assert result.exit_code == 2
    assert "neither an embedded model" in _plain(result.output)


def test_serve_ray_refuses_bad_options_before_starting_ray(tiny_llama, tmp_path):
    """Each bad option is named and nothing is started (a Ray start would take seconds and leave processes)."""
    bad_toml = tmp_path / "tenants.toml"
    bad_toml.write_text("[[tenants]]\nname = 1\n")
    for args, rule in ((["--adapters", str(tmp_path / "none")], "adapters directory not found"),
                       (["--config", str(bad_toml)], "tenants.toml"),
                       (["--max-model-len", "8", "--max-batch", "1", "--base", "/no/such/model"], "/no/such/model")):
        result = runner.invoke(app, ["serve", "--ray", "--base", str(tiny_llama), *args])
        assert result.exit_code == 2, result.output
        assert rule in _plain(result.output).replace("\n", "")
