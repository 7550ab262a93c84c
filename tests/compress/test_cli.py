"""`compress`, `merge` and `frontier` through typer's CliRunner on a tiny model (synthetic calibration tokens)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from deltafleet.cli import app

runner = CliRunner()


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_compress_writes_artifact_report_and_plots_then_merges(tiny_llama, tiny_ft, tmp_path):
    out = tmp_path / "dc"
    text = _ok(["compress", "--base", tiny_llama, "--finetuned", tiny_ft, "--method", "delta-come", "--ratio", "1/8",
                "--calib", "synthetic", "--calib-seqs", "2", "--calib-len", "16", "--out", out])
    assert "ratio 0.1" in text and "whole delta" in text and "tables" in text and "gains" in text
    m = json.loads((out / "deltafleet.json").read_text())
    assert m["method"] == "delta-come" and m["bytes"]["compressed"] <= m["bytes"]["fp16_delta"] / 8
    for f in ("report.md", "spectrum.png", "bits.png", "error.png", "delta.safetensors"):
        assert (out / f).stat().st_size > 0, f
    report = (out / "report.md").read_text()
    assert "## Bytes per part" in report and "| gains | 2 | 512 | 512 | 1.00000 |" in report
    assert "| lm_head | 320x128 |" in report
    _ok(["merge", "--base", tiny_llama, "--adapter", out, "--out", tmp_path / "merged"])
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "config.json").is_file()


def test_errors_exit_2_naming_the_rule(tiny_llama, tiny_ft, tmp_path):
    r = runner.invoke(app, ["compress", "--base", str(tiny_llama), "--finetuned", str(tiny_ft), "--method", "zip",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "method='zip'" in r.output
    r = runner.invoke(app, ["compress", "--base", str(tiny_llama), "--finetuned", str(tiny_ft), "--ratio", "2",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "ratio='2'" in r.output


def test_frontier_measures_each_method_and_ratio(tiny_llama, tiny_ft, tmp_path):
    out = tmp_path / "frontier"
    _ok(["bench", "compress", "--base", tiny_llama, "--finetuned", tiny_ft, "--methods", "delta-come,lowrank,bitdelta",
         "--ratios", "1/8,1/32", "--quantizer", "rtn", "--calib", "synthetic", "--calib-seqs", "2",
         "--calib-len", "16", "--eval-seqs", "2", "--out", out])
    points = json.loads((out / "frontier.json").read_text())
    got = {(p["method"], p["ratio"]): p for p in points}
    assert got[("no-delta", 0.0)]["kl"] > got[("delta-come", 1 / 8)]["kl"] > 0 == got[("finetuned", 1.0)]["kl"]
    assert got[("bitdelta", 1 / 32)]["skipped"] and got[("bitdelta", 1 / 8)]["kl"] > 0
    for m in ("delta-come", "lowrank"):
        assert got[(m, 1 / 8)]["kl"] < got[(m, 1 / 32)]["kl"]  # more bytes, closer to the fine-tune
        assert got[(m, 1 / 8)]["rel_error"] < got[(m, 1 / 32)]["rel_error"]
    assert (out / "frontier.png").stat().st_size > 0 and "| delta-come | 1/8 |" in (out / "frontier.md").read_text()


def test_frontier_on_task_prompts_with_mean_accuracy_over_tasks(chat_tiny, tmp_path):
    """--task a,b: KL on the tasks' test prompts + answers (the issue's 'held-out task prompts') and accuracy as
    the mean over the tasks; the header says what the KL was measured on."""
    from tests.compress.conftest import make_finetune

    ft = make_finetune(chat_tiny, tmp_path / "ft", scale=0.08)
    out = tmp_path / "frontier"
    _ok(["bench", "compress", "--base", chat_tiny, "--finetuned", ft, "--methods", "lowrank", "--ratios", "1/4,1/32",
         "--calib", "synthetic", "--calib-seqs", "2", "--calib-len", "16", "--task", "sort,caesar",
         "--examples", "3", "--out", out])
    points = {(p["method"], p["ratio"]): p for p in json.loads((out / "frontier.json").read_text())}
    assert points[("no-delta", 0.0)]["kl"] > points[("lowrank", 1 / 32)]["kl"] > points[("lowrank", 1 / 4)]["kl"] > 0
    assert all(p["accuracy"] is not None and 0.0 <= p["accuracy"] <= 1.0 for p in points.values())
    assert "KL on 3 test prompts + answers of each of sort, caesar" in (out / "frontier.md").read_text()
    r = runner.invoke(app, ["bench", "compress", "--base", str(chat_tiny), "--finetuned", str(ft), "--kl-on", "task",
                            "--calib", "synthetic", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "kl_on='task'" in r.output


def test_task_sequences_group_by_length_without_padding(smollm2_tokenizer):
    from deltafleet.compress.frontier import task_sequences

    batches = task_sequences(smollm2_tokenizer, ["sort", "caesar"], 4)
    assert sum(b.shape[0] for b in batches) == 8
    assert len({b.shape[1] for b in batches}) == len(batches)  # one batch per length


def test_greedy_batch_equals_one_prompt_at_a_time(chat_tiny):
    """The frontier's batched accuracy answers are the tokens greedy generation gives each prompt alone."""
    import random

    from deltafleet.eval.core import greedy_batch
    from deltafleet.models.generate import greedy_generate
    from deltafleet.models.loading import load_model

    model, _ = load_model(chat_tiny)
    rng = random.Random(0)
    prompts = [([rng.randrange(300) for _ in range(rng.randint(2, 12))], rng.randint(1, 9)) for _ in range(7)]
    stop = 7
    got = greedy_batch(model, prompts, stop, max_batch=3, model_len=32)
    want = [greedy_generate(model, p, n, (stop,)) for p, n in prompts]
    assert [g[: len(w)] for g, w in zip(got, want, strict=True)] == want
    assert all(len(g) == len(w) or (len(g) == len(w) + 1 and g[-1] == stop) for g, w in zip(got, want, strict=True))
