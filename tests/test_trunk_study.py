"""benchmarks/studies/trunk_study.py: its rule on hand-made rows, and rows on small synthetic images with a planted
defect through randomly initialized trunks (no weights package needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark
from cavga.model.efficientnet_lite import LITE_NETWORKS


def _rows(study, changes: dict[str, dict] | None = None) -> list[dict]:
    """One row per (set, candidate): every figure 0.9, fill 10 s and inference 50 ms, less what ``changes`` gives a
    candidate: ``delta`` added to every figure, ``loss`` (dataset, metric, amount) taken off one, ``fill`` and
    ``infer`` multiplying its costs on every set."""
    changes = changes or {}
    rows = []
    for name in study.SETS:
        for candidate in study.CANDIDATES:
            change = changes.get(candidate, {})
            figures = {m: 0.9 + change.get("delta", 0.0) for m in study.METRICS}
            loss = change.get("loss")
            if loss and loss[0] == name:
                figures[loss[1]] -= loss[2]
            rows.append(
                {
                    "dataset": name,
                    "candidate": candidate,
                    **figures,
                    "fill_seconds": 10.0 * change.get("fill", 1.0),
                    "infer_ms": 50.0 * change.get("infer", 1.0),
                    **{"image_auroc_max": 0.9, "iou_mask": 0.2, "iou_ceiling": 0.3, "input_px": 256, "channels": 176},
                    **{"features_seconds": 2.0, "memory_seconds": 8.0, "infer_ms_median": 55.0},
                }
            )
    return rows


def test_without_a_clear_gain_the_default_stays():
    study = load_benchmark("trunk_study")
    verdict = study.choose(_rows(study))
    assert verdict["winner"] == "lite0@256" and verdict["qualified"] == list(sorted(study.CANDIDATES))
    verdict = study.choose(_rows(study, {"lite2@256": {"delta": 0.004}}))
    assert verdict["winner"] == "lite0@256" and verdict["candidates"]["lite2@256"]["gain"] == pytest.approx(0.004)


def test_the_highest_qualifying_score_wins_and_each_condition_disqualifies():
    study = load_benchmark("trunk_study")
    gains = {"lite1@256": {"delta": 0.006}, "lite2@256": {"delta": 0.01}}
    assert study.choose(_rows(study, gains))["winner"] == "lite2@256"
    assert "winner lite2@256" in study.markdown(_rows(study, gains))
    # (b) and (c) at their bounds qualify, just above them do not; they are read on bottle.
    bounds = {**gains, "lite2@256": {"delta": 0.01, "fill": 1.3, "infer": 1.5}}
    assert study.choose(_rows(study, bounds))["winner"] == "lite2@256"
    for cost, ratio, condition in (("fill", 1.31, "(b)"), ("infer", 1.51, "(c)")):
        over = {**gains, "lite2@256": {"delta": 0.01, cost: ratio}}
        verdict = study.choose(_rows(study, over))
        assert verdict["winner"] == "lite1@256", cost
        assert verdict["candidates"]["lite2@256"]["failed"][0].startswith(condition)
    # (a): a loss of more than 0.005 on one metric of one set, even with a gain everywhere else.
    loses = {**gains, "lite2@256": {"delta": 0.01, "loss": ("capsule", "aupro", 0.016)}}
    verdict = study.choose(_rows(study, loses))
    assert verdict["winner"] == "lite1@256"
    assert verdict["candidates"]["lite2@256"]["failed"] == ["(a) loses 0.006 aupro on capsule"]
    assert "lite2@256" not in verdict["qualified"]


def test_the_demo_categories_count_as_one_set():
    study = load_benchmark("trunk_study")
    # 0.012 off one demo category is 0.004 off the demo set: within the tolerance.
    verdict = study.choose(_rows(study, {"lite1@256": {"loss": ("demo/wood", "pixel_auroc", 0.012)}}))
    assert "lite1@256" in verdict["qualified"]
    assert verdict["candidates"]["lite1@256"]["worst_loss"] == pytest.approx(0.004)
    assert verdict["candidates"]["lite1@256"]["worst_loss_at"] == "pixel_auroc on demo"
    assert set(verdict["candidates"]["lite1@256"]["per_set"]) == {"bottle", "capsule", "magnetic_tile", "demo"}


def test_no_verdict_without_the_reference_on_every_set_and_incomplete_candidates_are_left_out():
    study = load_benchmark("trunk_study")
    rows = _rows(study, {"lite2@256": {"delta": 0.01}})
    partial = [r for r in rows if not (r["candidate"] == "lite2@256" and r["dataset"] == "demo/pill")]
    verdict = study.choose(partial)
    assert "lite2@256" not in verdict["candidates"] and verdict["winner"] == "lite0@256"
    assert study.choose([r for r in rows if r["dataset"] != "bottle"])["winner"] is None
    assert "winner None" in study.markdown([r for r in rows if r["dataset"] != "bottle"])


def _split(study, n: int, defect: bool, generator: torch.Generator):
    """n images of 64 px: smooth noise, with a bright square in the defective ones (and its mask)."""
    images = 0.4 + 0.05 * torch.rand(n, 3, 64, 64, generator=generator)
    masks = np.zeros((n, 64, 64), bool)
    if defect:
        images[:, :, 24:40, 24:40] = 1.0
        masks[:, 24:40, 24:40] = True
    return images, masks


def _parts(study) -> dict:
    g = torch.Generator().manual_seed(0)
    fit, _ = _split(study, 12, False, g)
    cal, _ = _split(study, 3, False, g)
    normal, normal_masks = _split(study, 4, False, g)
    bad, bad_masks = _split(study, 4, True, g)
    labels = np.array([0] * 4 + [1] * 4)
    test = study.Split(torch.cat([normal, bad]), np.concatenate([normal_masks, bad_masks]), labels, np.ones(8, bool))
    empty = (np.zeros((0, 64, 64), bool), np.zeros(0, int), np.zeros(0, bool))
    return {"fit": study.Split(fit, *empty), "cal": study.Split(cal, *empty), "test": test}


def test_rows_on_a_planted_defect_through_random_trunks(monkeypatch):
    study = load_benchmark("trunk_study")
    monkeypatch.setattr(study, "ROWS", 128)
    monkeypatch.setattr(study, "INFER_REPS", 2)

    def random_trunk(variant):
        torch.manual_seed(0)
        return LITE_NETWORKS[variant](3, classifier=False).eval()

    monkeypatch.setattr(study, "build_trunk", random_trunk)
    parts = _parts(study)
    threads = torch.get_num_threads()
    rows = {c: study.run_row("bottle", c, parts) for c in study.CANDIDATES}
    assert torch.get_num_threads() == threads  # the one-thread timing gives the threads back
    assert {c: (r["input_px"], r["grid"], r["channels"]) for c, r in rows.items()} == {
        "lite0@256": (64, 8, 176),
        "lite0@320": (80, 10, 176),
        "lite1@256": (64, 8, 176),
        "lite2@256": (64, 8, 192),
    }
    for candidate, row in rows.items():
        assert row["image_auroc"] == 1.0 and row["pixel_auroc"] > 0.9, candidate
        assert row["iou_ceiling"] >= row["iou_mask"] >= 0.0
        assert row["fill_seconds"] >= row["features_seconds"] > 0 and row["infer_ms_median"] >= row["infer_ms"] > 0
    assert rows["lite0@320"]["candidates"] == 12 * 100
