"""Latency of cavga's default model against anomalib's PatchCore on the same EfficientNet-Lite0 trunk, side by side
in one run: 256 px, batch 1, one thread, a preprocessed image in, the anomaly map and score out.

* cavga: the default detector's inference path (:func:`cavga.engine.infer.infer_batch`, what ``Cavga.predict``,
  ``cavga predict`` and ``cavga serve`` run after reading the image), its trunk memory filled to its 8192 rows;
  also the share of the exact nearest-row search (the trunk memory's ``forward`` timed alone).
* anomalib 2.7's ``PatchcoreModel`` (its torch model, eval mode): timm's ``efficientnet_lite0`` at strides 8 and 16
  (``blocks.2``, ``blocks.4``: PatchCore's two middle levels, 152 channels), 3 x 3 averaging, a memory bank of
  ``--bank-rows`` rows (default 19251: PatchCore's 10 % coreset of bottle's 188 training images x 32 x 32
  positions).

Latency depends neither on the weights nor on the memory's values, only on their sizes, so both run with random
weights and random memories (anomalib is installed in a venv of its own, as ``benchmarks/anomalib_padim.py``
says). The two are timed alternately, ``--rounds`` rounds of ``--repeats`` runs each after warm-up, each in its
own process (anomalib's with its own interpreter); the medians of all runs are compared. Prints a table and
writes JSON::

    python -m venv .venv-anomalib && .venv-anomalib/bin/pip install -c constraints.txt anomalib==2.7.0
    python benchmarks/patchcore_latency.py --anomalib-python .venv-anomalib/bin/python \
        --out benchmarks/results/patchcore_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# The timer of the anomalib PaDiM script: it imports no cavga, so it runs under anomalib's interpreter too.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomalib_padim import _times_ms  # noqa: E402

SIZE, BANK_ROWS, WARMUP = 256, 19251, 3


def cavga_worker(repeats: int) -> dict:
    """The default detector's inference at batch 1 (and its nearest-row search alone), one thread."""
    import torch

    from cavga.config import ModelConfig
    from cavga.engine.calibration import Calibration
    from cavga.engine.infer import MapChoice, infer_batch
    from cavga.model.memory import patch_features
    from cavga.model.networks import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ModelConfig(variant="L", image_size=SIZE)
    model = build_model(config, read_weights=False).eval()
    memory = model.trunk_memory
    memory.bank.copy_(torch.randn_like(memory.bank))
    memory.n_vectors.fill_(memory.size)
    calibration = Calibration(0.0, 1.0, 0.95, 1, map_threshold=1.0)
    x = torch.rand(1, 3, SIZE, SIZE)
    choice = MapChoice.of(config)
    with torch.inference_mode():
        features = patch_features(model.encoder.forward_levels(x), config.trunk_pool)
        total = _times_ms(lambda: infer_batch(model, x, calibration, choice=choice, reconstruct=False), repeats, WARMUP)
        search = _times_ms(lambda: memory(features), repeats, WARMUP)
    return {"total_ms": total, "search_ms": search, "memory_rows": memory.size, "channels": memory.channels}


def anomalib_worker(repeats: int, bank_rows: int) -> dict:
    """anomalib's PatchcoreModel on efficientnet_lite0 at batch 1, one thread."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone="efficientnet_lite0", pre_trained=False).eval()
    with torch.no_grad():
        channels = sum(f.shape[1] for f in model.feature_extractor(torch.rand(1, 3, SIZE, SIZE)).values())
    model.memory_bank = torch.randn(bank_rows, channels)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        total = _times_ms(lambda: model(x), repeats, WARMUP)
    return {"total_ms": total, "memory_rows": bank_rows, "channels": channels}


def run_worker(python: str, kind: str, repeats: int, bank_rows: int) -> dict:
    command = [python, __file__, "--worker", kind, "--repeats", str(repeats), "--bank-rows", str(bank_rows)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anomalib-python", help="the interpreter of a venv with anomalib 2.7 installed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bank-rows", type=int, default=BANK_ROWS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/patchcore_latency.json"))
    parser.add_argument("--worker", choices=("cavga", "anomalib"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "cavga":
        print(json.dumps(cavga_worker(args.repeats)))
        return 0
    if args.worker == "anomalib":
        print(json.dumps(anomalib_worker(args.repeats, args.bank_rows)))
        return 0
    if not args.anomalib_python:
        parser.error("--anomalib-python is required (see the module docstring)")
    runs: dict[str, list[dict]] = {"cavga": [], "anomalib": []}
    for _ in range(args.rounds):  # alternately, so that a change of the machine's load falls on both
        runs["cavga"].append(run_worker(sys.executable, "cavga", args.repeats, args.bank_rows))
        runs["anomalib"].append(run_worker(args.anomalib_python, "anomalib", args.repeats, args.bank_rows))
    median = {k: statistics.median(t for r in v for t in r["total_ms"]) for k, v in runs.items()}
    search = statistics.median(t for r in runs["cavga"] for t in r["search_ms"])
    record = {
        "command": " ".join(["python", "benchmarks/patchcore_latency.py", *(argv or sys.argv[1:])]),
        "size": SIZE,
        "threads": 1,
        "batch": 1,
        "cavga_ms": round(median["cavga"], 2),
        "cavga_search_ms": round(search, 2),
        "cavga_search_share": round(search / median["cavga"], 3),
        "anomalib_patchcore_ms": round(median["anomalib"], 2),
        "ratio_cavga_to_patchcore": round(median["cavga"] / median["anomalib"], 3),
        "cavga_memory": [runs["cavga"][0]["memory_rows"], runs["cavga"][0]["channels"]],
        "patchcore_memory": [runs["anomalib"][0]["memory_rows"], runs["anomalib"][0]["channels"]],
        "runs": runs,
    }
    print("| model | memory (rows x channels) | latency ms (median) |")
    print("|---|---|---|")
    print(f"| cavga default (trunk_knn) | {record['cavga_memory'][0]} x {record['cavga_memory'][1]} | "
          f"{record['cavga_ms']:.1f} (of which the nearest-row search {record['cavga_search_ms']:.1f}) |")  # fmt: skip
    print(f"| anomalib 2.7 PatchCore, Lite0 | {record['patchcore_memory'][0]} x {record['patchcore_memory'][1]} | "
          f"{record['anomalib_patchcore_ms']:.1f} |")  # fmt: skip
    print(f"cavga / PatchCore: {record['ratio_cavga_to_patchcore']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
