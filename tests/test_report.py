"""HTML report: the page's content, the CLI, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cavga.report.html import build_report, find_runs, histogram, write_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_histogram_bins_include_one():
    np.testing.assert_array_equal(histogram(np.array([0.0, 0.04, 0.05, 0.5, 1.0]), bins=4), [2 + 1, 0, 1, 1])
    np.testing.assert_array_equal(histogram(np.array([0.0, 0.26, 0.5, 1.0]), bins=4), [1, 1, 1, 1])


def write_fake_run(root: Path, n: int = 10, with_truth: bool = True, seed: int = 0) -> Path:
    """An evaluation output folder as cavga evaluate writes it, with tiny overlay PNGs."""
    rng = np.random.default_rng(seed)
    (root / "overlays").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        truth = "anomalous" if i % 2 else "normal"
        score = float(rng.random())
        pred = "anomalous" if score > 0.5 else "normal"
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "overlays" / f"{i}.png")
        line = {"path": f"imgs/{i:03d}.png", "pred_score": score, "pred_label": int(pred == "anomalous")}
        line["overlay"] = f"overlays/{i}.png"
        if with_truth:
            line |= {
                "gt_label": int(truth == "anomalous"),
                "defect_type": "scratch" if i % 4 == 1 else ("good" if i % 2 == 0 else "hole"),
            }
            line["correct"] = pred == truth
        lines.append(line)
    (root / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if with_truth:
        metrics = {"image_auroc": 0.5, "pixel_auroc": 0.75, "iou": 0.1, "iou_pooled": 0.2, "aupro": 0.3}
        metrics |= {"balanced_accuracy": 0.5, "n_images": n}
        (root / "metrics.json").write_text(json.dumps(metrics))
        (root / "curves.json").write_text(
            json.dumps({"threshold": 0.5, "pixel_roc": {"fpr": [0, 0.2, 1], "tpr": [0, 0.8, 1]}, "image_roc": None})
        )
    return root


def test_page_content_is_self_contained(tmp_path):
    run = write_fake_run(tmp_path / "run")
    page = write_report(run).read_text()
    assert page.count('<figure class="card') == 10
    assert page.count('src="data:image/png;base64,') == 10  # embedded by default (small)
    # Nothing is fetched from elsewhere: no http(s) address but the SVG namespace name.
    addresses = set(re.findall(r"https?://[^\s\"']+", page))
    assert addresses <= {"http://www.w3.org/2000/svg"}
    assert "<script src" not in page and '<link rel="stylesheet"' not in page
    assert "0.750" in page and "image-level ROC" in page and "threshold 0.5" in page
    assert 'option value="scratch"' in page and 'option value="hole"' in page
    linked = write_report(run, tmp_path / "elsewhere" / "r.html", embed=False).read_text()
    assert 'src="../run/overlays/0.png"' in linked


def test_per_object_metrics_get_a_row_and_a_line(tmp_path):
    """A run on tiles (several exposures of one object) shows the per-object metrics beside the per-image ones."""
    from cavga.report.outputs import format_metrics_table

    run = write_fake_run(tmp_path / "run")
    group = {"image_auroc": 0.8125, "image_auroc_mean": 0.6875, "balanced_accuracy": 0.625}
    group |= {"n_groups": 4, "n_anomalous_groups": 2}
    metrics = json.loads((run / "metrics.json").read_text()) | {"per_group": group}
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(run).read_text()
    row = re.search(r'<tr class="per-object"><td>run, per object</td>(.*?)</tr>', page)
    assert row is not None
    assert re.findall(r"<td>(.*?)</td>", row.group(1)) == ["0.812", "-", "-", "-", "-", "0.625", "4 objects"]
    assert "per object" not in write_report(write_fake_run(tmp_path / "plain")).read_text()
    table = format_metrics_table({"model": metrics})
    assert table.splitlines()[-1] == (
        "model, per object: 4 objects (2 anomalous), each scored by the maximum of its images: image_auroc 0.812 "
        "(by the mean 0.688), balanced_accuracy 0.625"
    )
    assert "per object" not in format_metrics_table({"model": {"image_auroc": 0.5}})


def test_find_runs_of_a_demo_folder(tmp_path):
    write_fake_run(tmp_path / "demo" / "predictions" / "wood", n=4)
    write_fake_run(tmp_path / "demo" / "predictions" / "pill", n=6, seed=1)
    (tmp_path / "demo" / "predictions" / "wood" / "metrics.json").unlink()
    top = {"image_auroc": 0.9, "per_category": {"wood": {"image_auroc": 0.7, "n_images": 4}}}
    (tmp_path / "demo" / "metrics.json").write_text(json.dumps(top))
    runs, top_metrics = find_runs(tmp_path / "demo")
    assert [r.name for r in runs] == ["pill", "wood"]
    assert runs[1].metrics == {"image_auroc": 0.7, "n_images": 4}  # from the top metrics' per_category
    assert top_metrics["image_auroc"] == 0.9
    page = build_report(runs, tmp_path / "demo" / "report.html", top_metrics).read_text()
    assert 'id="f-run"' in page and '<tr class="mean">' in page


def test_report_of_a_prediction_run_without_truth(tmp_path):
    page = write_report(write_fake_run(tmp_path / "p", n=3, with_truth=False)).read_text()
    assert "no ground truth" in page and 'id="f-outcome"' not in page and page.count("<figure") == 3


def test_missing_run_dir_is_a_clear_error(tmp_path):
    from cavga.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        # Playwright gives every launch a fresh, empty user-data dir.
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


def _open(browser, path: Path):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, problems


def _visible(page) -> int:
    return page.locator("#gallery .card:visible").count()


@pytest.mark.parametrize("embed", [True, False])
def test_report_in_headless_chromium(browser, tmp_path, embed):
    run = write_fake_run(tmp_path / "run", n=12)
    lines = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    page, problems = _open(browser, write_report(run, embed=embed))
    assert problems == []
    assert _visible(page) == 12
    widths = page.evaluate("Array.from(document.querySelectorAll('#gallery img')).map(i => i.naturalWidth)")
    assert widths == [16] * 12  # every overlay decoded
    assert page.locator("svg.chart").count() == 3  # image ROC, pixel ROC, one histogram
    page.select_option("#f-label", "anomalous")
    assert _visible(page) == sum(x["gt_label"] == 1 for x in lines)
    page.select_option("#f-outcome", "incorrect")
    n_wrong = sum(x["gt_label"] == 1 and not x["correct"] for x in lines)
    assert _visible(page) == n_wrong
    assert page.locator("#shown").text_content() == f"{n_wrong} of 12 images"
    page.select_option("#f-outcome", "all")
    page.select_option("#f-defect", "scratch")
    assert _visible(page) == sum(x["defect_type"] == "scratch" for x in lines)
    page.select_option("#f-label", "all")
    page.select_option("#f-defect", "all")
    page.select_option("#sort", "score-asc")
    shown = [float(s) for s in page.eval_on_selector_all("#gallery .card", "cs => cs.map(c => c.dataset.score)")]
    np.testing.assert_allclose(shown, sorted(x["pred_score"] for x in lines), atol=1e-6)  # 6 decimals in the page
    assert problems == []
    page.close()


@pytest.mark.slow
def test_cli_evaluate_report_and_export(tmp_path, browser):
    """cavga evaluate writes overlays + report; cavga report rewrites it; cavga export writes a loadable file."""
    import cavga
    from cavga.cli import main
    from tiny_data import write_tiny_mvtec

    root = write_tiny_mvtec(tmp_path / "data")
    options = {"image_size": 32, "width": 8, "latent_channels": 8, "epochs": 1, "batch_size": 4, "device": "cpu"}
    cavga.Cavga("D", "u", **options).fit(root, category="bottle", progress=False).save(tmp_path / "model")
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "model"), str(root), "--category", "bottle", "--out", str(out)]) == 0
    for name in ("metrics.json", "predictions.jsonl", "curves.json", "report.html"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 6
    assert main(["report", str(out), "--out", str(tmp_path / "r.html"), "--link"]) == 0
    page, problems = _open(browser, tmp_path / "r.html")
    assert problems == [] and _visible(page) == 6
    assert min(page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")) == 40
    page.select_option("#f-label", "normal")
    assert _visible(page) == 3
    page.close()
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    assert main(["export", str(tmp_path / "model"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", str(tmp_path / "model"), "--format", "pt2"]) == 0
    assert (tmp_path / "model" / "model.pt2").is_file()


@pytest.mark.slow
def test_a_w_models_labels_are_shown_apart_from_the_evaluated_images(tmp_path, browser):
    """cavga train --setting w --anomalous DIR: the evaluation names the label images, the report shows each of
    them once in its own section (decoded in the browser) and never in the gallery or the charts."""
    from cavga.cli import main
    from tiny_data import write_tiny_mvtec

    root = write_tiny_mvtec(tmp_path / "data")
    labels = root / "bottle/test/spot"  # the user points at a test folder: those images must not count
    label_names = sorted(p.name for p in labels.iterdir())
    tiny = ["--variant", "D", "--image-size", "32", "--width", "8", "--latent-channels", "8", "--epochs", "1"]
    model, out = tmp_path / "model", tmp_path / "eval"
    train = ["train", str(root), "--category", "bottle", "--out", str(model), "--setting", "w"]
    assert main([*train, "--anomalous", str(labels), *tiny, "--batch-size", "4", "--no-progress"]) == 0
    assert main(["evaluate", str(model), str(root), "--category", "bottle", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(Path(p).name for p in metrics["labelled_images"]) == label_names
    assert all(Path(p).parent == labels.resolve() for p in metrics["labelled_images"])
    evaluated = [json.loads(x)["path"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(evaluated) == metrics["n_images"] == 3
    assert not [p for p in evaluated if Path(p).resolve().parent == labels.resolve()]
    page, problems = _open(browser, out / "report.html")
    assert problems == []
    assert _visible(page) == 3
    assert page.locator("#labels .card").count() == len(label_names)
    widths = page.evaluate("Array.from(document.querySelectorAll('#labels img')).map(i => i.naturalWidth)")
    assert len(widths) == len(label_names) and min(widths) > 0  # every label image decoded
    captions = page.eval_on_selector_all("#labels figcaption", "cs => cs.map(c => c.textContent)")
    assert sorted(c.split(" · ")[1] for c in captions) == label_names
    page.close()
