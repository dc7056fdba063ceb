"""anomalib's PaDiM (ResNet-18, layers 1-3, 100 random channels) timed as ``benchmarks/speed.py`` times cavga:
fit images/s (feature extraction into the memory bank), inference images/s at a batch, per-image latency at batch
1 on one thread, peak RSS. Random weights and images (speed does not depend on them). Prints one JSON line.

anomalib is not a dependency of cavga; it lives in a virtual environment of its own, beside the project's torch:

    python -m venv .venv-anomalib
    .venv-anomalib/bin/pip install -c constraints.txt anomalib
    python benchmarks/speed.py --anomalib-python .venv-anomalib/bin/python

(``speed.py`` runs this script with that interpreter.)
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import numpy as np
import torch


def _times_ms(fn, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--latency-reps", type=int, default=15)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomalib's import-time deprecation notices of its own submodules
        import anomalib
        from anomalib.models.image.padim.torch_model import PadimModel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = PadimModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False)
    images = torch.rand(args.batch, 3, args.size, args.size)
    model.train()
    fit_ms = _times_ms(lambda: model(images), args.reps, warmup=1)
    model.fit()
    model.eval()
    with torch.inference_mode():
        infer_ms = _times_ms(lambda: model(images), args.reps)
        torch.set_num_threads(1)
        one = images[:1].clone()
        latency_ms = _times_ms(lambda: model(one), args.latency_reps)
    record = {
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "size": args.size,
        "threads": args.threads,
        "batch": args.batch,
        "fit_images_per_s": args.batch / (float(np.median(fit_ms)) / 1000),
        "infer_images_per_s": args.batch / (float(np.median(infer_ms)) / 1000),
        "latency_ms": {
            "median": float(np.median(latency_ms)),
            "q1": float(np.percentile(latency_ms, 25)),
            "q3": float(np.percentile(latency_ms, 75)),
            "n": len(latency_ms),
        },
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
