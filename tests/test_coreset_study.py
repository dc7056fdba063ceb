"""benchmarks/studies/coreset_study.py: its rule on hand-made rows, and one row on synthetic trunk levels with a planted
defect (the figures it reports rank the defect, and every projection of a memory holding all candidates agrees)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark


def _rows(study, losses: dict[int, float]) -> list[dict]:
    """One row per (set, projection): figures 0.9 less the projection's loss on capsule's AUPRO alone."""
    rows = []
    for name in study.SETS:
        for projection, loss in losses.items():
            figures = {m: 0.9 for m in study.METRICS}
            if name == "capsule":
                figures["aupro"] -= loss
            rows.append({"dataset": name, "projection": projection, **figures})
    return rows


def test_the_rule_takes_the_fewest_dimensions_within_the_tolerance_on_every_set():
    study = load_benchmark("coreset_study")
    verdict = study.choose(_rows(study, {128: 0.0, 64: 0.004, 32: 0.006, 16: 0.02}))
    assert verdict["qualified"] == [64, 128] and verdict["winner"] == 64
    assert verdict["worst_loss"][32] == pytest.approx(0.006)
    # Nothing below the reference qualifies: the reference stays.
    assert study.choose(_rows(study, {128: 0.0, 64: 0.01}))["winner"] == 128
    # A projection missing a set is not a candidate; without the reference on every set there is no verdict.
    rows = [r for r in _rows(study, {128: 0.0, 32: 0.0}) if not (r["projection"] == 32 and r["dataset"] == "bottle")]
    assert study.choose(rows)["qualified"] == [128]
    assert study.choose([r for r in rows if r["dataset"] != "capsule"])["winner"] is None


def _levels(n: int, generator: torch.Generator, spot: bool = False) -> dict[int, torch.Tensor]:
    levels = {4: torch.randn(n, 24, 8, 8, generator=generator), 8: torch.randn(n, 40, 4, 4, generator=generator)}
    levels[16] = torch.randn(n, 112, 2, 2, generator=generator)
    if spot:  # a defect at the stride-8 cell (1, 1) of every image, in all three levels
        levels[4][:, :, 2:4, 2:4] += 6.0
        levels[8][:, :, 1, 1] += 6.0
        levels[16][:, :, 0, 0] += 3.0
    return levels


def _planted_parts() -> dict:
    """A study's parts of one set: 20 normal images to fill the memory, 4 held out, and 8 test images of which the
    last 4 carry the planted defect, with its masks, labels and has-mask flags."""
    g = torch.Generator().manual_seed(0)
    normal_test, defect_test = _levels(4, g), _levels(4, g, spot=True)
    test_levels = {s: torch.cat([normal_test[s], defect_test[s]]) for s in normal_test}
    masks = np.zeros((8, 32, 32), bool)
    masks[4:, 8:16, 8:16] = True  # the stride-8 cell (1, 1) at 32 px
    labels, has = np.array([0] * 4 + [1] * 4), np.ones(8, bool)
    return {"fit": (_levels(20, g),), "cal": (_levels(4, g),), "test": (test_levels, masks, labels, has)}


def test_a_row_ranks_a_planted_defect_and_a_memory_of_every_candidate_ignores_the_projection():
    study = load_benchmark("coreset_study")
    parts = _planted_parts()
    study.ROWS = 20 * 16  # a memory as large as the candidates: no coreset, so every projection is the same
    rows = [study.run_row("bottle", projection, parts) for projection in (128, 16)]
    assert rows[0]["image_auroc"] == 1.0 and rows[0]["pixel_auroc"] > 0.9
    assert rows[0]["candidates"] == 320 and rows[0]["projection"] == 128
    for key in ("image_auroc", "pixel_auroc", "aupro", "balanced_accuracy", "iou_ceiling", "iou_mask"):
        assert rows[0][key] == rows[1][key], key


def test_the_default_map_studys_row_scores_the_same_planted_defect():
    """benchmarks/studies/default_map.py shares the scoring (score_memory): its row of the same parts ranks the
    defect."""
    study = load_benchmark("default_map")
    parts = _planted_parts()
    row = study.run_row("bottle", "4+8+16:1:64", parts)
    assert row["channels"] == 176 and row["image_auroc"] == 1.0 and row["pixel_auroc"] > 0.9
    assert row["iou_ceiling"] >= max(row[f"iou_q{q}"] for q in study.MASK_QUANTILES)


def test_the_image_score_study_scores_a_planted_defect_every_way_and_keeps_max_without_a_clear_gain():
    study = load_benchmark("image_score")
    parts = _planted_parts()
    study.ROWS = 64
    row = study.run_row("bottle", "all", parts)
    for score in study.SCORES:
        assert row[f"{score}_image_auroc"] == 1.0, score
    rows = [{**row, "dataset": name} for name in study.SETS]
    assert study.choose(rows)["winner"] == "max"  # all equal: no gain, max stays
    for r in rows:  # a candidate 0.01 better everywhere wins
        r |= {f"{c}_image_auroc": 0.95 for c in study.SCORES} | {"top1_image_auroc": 0.96}
    assert study.choose(rows)["winner"] == "top1"
    rows[0]["top1_image_auroc"] = 0.94  # ... unless it loses more than 0.005 on one set
    assert "top1" not in study.choose(rows)["qualified"]
