"""Per-image CPU latency of eager inference (``Cavga.predict``'s path: ``infer_batch`` with autograd Grad-CAM)
vs the exported ONNX graph (onnxruntime, closed-form Grad-CAM) for CAVGA-D 64 px and CAVGA-R 128 px.

Untrained models of the default width (latency does not depend on the weights). Each measurement runs one
preprocessed image (batch 1) ``--repeats`` times after warm-up runs; the table shows the median and the
interquartile range in milliseconds. Prints a Markdown table and writes JSON.

    python benchmarks/latency.py [--repeats 30] [--threads 1] [--out benchmarks/results/latency.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cavga
from cavga.config import LossWeights, ModelConfig, TrainConfig
from cavga.data import Preprocess
from cavga.engine.infer import Calibration, infer_batch
from cavga.export import OnnxInferencer, export
from cavga.model.networks import build_model

MODELS = {"CAVGA-D 64 px": {"variant": "D", "image_size": 64}, "CAVGA-R 128 px": {"variant": "R", "image_size": 128}}


def _detector(options: dict) -> cavga.Cavga:
    config = ModelConfig(**options, channels=3)
    detector = cavga.Cavga.__new__(cavga.Cavga)
    detector.model_config = config
    detector.train_config = TrainConfig(weights=LossWeights())
    detector.model_ = build_model(config).eval()
    detector.calibration_ = Calibration(0.0, 0.1, 0.95, 1, map_threshold=0.1)
    detector.preprocess_ = Preprocess(config.image_size, 3)
    detector.calibration_quantile = 0.95
    detector.anomalous_fraction = detector.anomalous_count = detector.anomalous_dir = None
    detector.data_info_ = {}
    detector.channels_given = True
    return detector


def _time(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _summary(times: list[float]) -> dict:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "n": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    results = {}
    for name, options in MODELS.items():
        torch.manual_seed(0)
        detector = _detector(options)
        size = options["image_size"]
        x = torch.rand(1, 3, size, size)
        with tempfile.TemporaryDirectory() as tmp:
            path = export(detector, Path(tmp) / "m.onnx", "onnx")
            inferencer = OnnxInferencer(path)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            inferencer.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            batch = x.numpy()
            eager = _time(lambda d=detector, x=x: infer_batch(d.model_, x, d.calibration_), args.repeats)
            onnx = _time(lambda i=inferencer, b=batch: i.run(b), args.repeats)
        results[name] = {"eager": _summary(eager), "onnx": _summary(onnx)}
        results[name]["speedup"] = results[name]["eager"]["median_ms"] / results[name]["onnx"]["median_ms"]
        print(f"{name}: eager {statistics.median(eager):.2f} ms, onnx {statistics.median(onnx):.2f} ms", flush=True)
    print()
    print("| model | eager median ms (IQR) | ONNX median ms (IQR) | speed-up |")
    print("|---|---|---|---|")
    for name, r in results.items():
        e, o = r["eager"], r["onnx"]
        print(
            f"| {name} | {e['median_ms']:.2f} ({e['q1_ms']:.2f}-{e['q3_ms']:.2f}) | "
            f"{o['median_ms']:.2f} ({o['q1_ms']:.2f}-{o['q3_ms']:.2f}) | {r['speedup']:.1f}x |"
        )
    record = {
        "what": "per-image latency, batch 1, CPU, untrained default-width models, setting u, attention map",
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
