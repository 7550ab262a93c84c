"""The frontier's target summary: the smallest ratio keeping 95% of the gain per method, the lowest-KL method per
ratio; reference rows and skipped points never count."""

from __future__ import annotations

from deltafleet.compress.frontier import Point, summary, summary_lines


def test_summary_picks_smallest_ratio_keeping_gain_and_lowest_kl():
    pts = [Point("finetuned", 1.0, kl=0.0, gain_kept=1.0), Point("no-delta", 0.0, kl=1.0, gain_kept=0.0),
           Point("delta-come", 1 / 16, kl=1e-3, gain_kept=1.0), Point("delta-come", 1 / 64, kl=5e-3, gain_kept=0.96),
           Point("delta-come", 1 / 256, kl=2e-2, gain_kept=0.5), Point("dare", 1 / 16, kl=2e-3, gain_kept=0.97),
           Point("dare", 1 / 64, kl=1e-3, gain_kept=0.2), Point("bitdelta", 1 / 64, skipped="below 1/16"),
           Point("lowrank", 1 / 256, kl=9e-2, gain_kept=0.1)]
    s = summary(pts)
    assert s["smallest_ratio_keeping_gain"] == {"delta-come": 1 / 64, "dare": 1 / 16, "lowrank": None}
    assert s["lowest_kl_method"] == {1 / 16: "delta-come", 1 / 64: "dare", 1 / 256: "delta-come"}
    text = "\n".join(summary_lines(pts))
    assert "delta-come 1/64, dare 1/16, lowrank none" in text and "1/64 dare" in text
