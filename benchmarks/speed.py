"""How fast cavga trains and infers on this machine, held against the machine's own limit, beside PaDiM.

Configurations (each in its own subprocess, so that its peak RSS is its own):

* the default model, CAVGA-L_u (frozen ImageNet EfficientNet-Lite0 trunk, latent Gaussian map, width 16) at 128 and
  256 px; the same recipe on the ResNet-18 trunk (frozen, random weights) at 256 px;
* the paper's CAVGA-D_u / D_w at 64 px and CAVGA-R_u at 128 px (map 1 - A), with the code paths the Grad-CAM
  optimizations replaced (``before``, ``naive`` hooks) and ``channels_last``;
* the PaDiM-style baseline of ``cavga.baselines`` (the same Lite0 features) at 256 px;
* anomalib's PaDiM (ResNet-18) at 256 px when an interpreter with anomalib is given (``benchmarks/anomalib_padim.py``
  says how to make one); skipped with a message otherwise, and always with ``--quick``.

For each: training images/s of the full ``training_step`` and of the plain VAE-GAN step (attention weights 0, no
attention maps); inference images/s at the inference batch of ``infer_batch`` (what ``Cavga.predict`` runs: map,
score and calibration), of a plain VAE forward (encoder, heads, decoder) and of the exported ONNX graph; per-image
latency at batch 1 on one thread (eager, plain, encoder alone, ONNX); FLOPs per image and GFLOP/s as a fraction of
the machine's peak (``speed_limits.py``: the best of a matmul, a 3x3 and a depthwise conv, and the cores' FMA width
x measured clock; float32 and bfloat16). bfloat16 autocast variants run only where the cores have AVX-512 BF16
(elsewhere bf16 is emulated and the kernel rates show it). Variants are timed interleaved (one call of each per
round), so their ratios share the machine's state. Untrained models, random images.

    python benchmarks/speed.py [--quick] [--threads N] [--anomalib-python PATH] [--out FILE.json]
    python benchmarks/speed.py --report FILE.json   # recompute peaks, fractions, ratios of a written run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling modules, also when this file is loaded by path (the tests)

from speed_limits import count_flops, machine_limits, with_peaks  # noqa: E402
from speed_paths import _batch, _inferrer, _onnx_runner, _trainer, build, padim_paths  # noqa: E402
from speed_paths import before_optimizations as before_optimizations  # noqa: E402  (the tests use it)

DEFAULT_OUT = HERE / "results" / "speed.json"
PAPER_TRAIN, PAPER_INFER = ("before", "channels_last"), ("before", "naive", "channels_last")
RECIPE_L = {"anomaly_map": "latent_gaussian", "score": "map_max", "freeze_encoder": True}


def _cavga(name, variant, size, width, setting="u", train=8, infer=16, reps=3, paper=False, options=None) -> dict:
    return {
        "kind": "cavga", "name": name, "variant": variant, "size": size, "width": width, "setting": setting,
        "train_batch": train, "infer_batch": infer, "reps": reps, "paper": paper, "options": options or {},
    }  # fmt: skip


def configs(quick: bool) -> list[dict]:
    if quick:
        return [
            _cavga("CAVGA-D_u 32 px", "D", 32, 8, train=4, infer=4, reps=2, paper=True),
            _cavga("CAVGA-L_u 64 px", "L", 64, 4, train=2, infer=4, reps=2),
            {"kind": "padim", "name": "PaDiM-style 64 px", "size": 64, "train_batch": 4, "infer_batch": 4, "reps": 2},
        ]
    return [
        _cavga("CAVGA-D_u 64 px", "D", 64, 64, train=16, reps=5, paper=True),
        _cavga("CAVGA-D_w 64 px", "D", 64, 64, setting="w", train=16, reps=5, paper=True),
        _cavga("CAVGA-R_u 128 px", "R", 128, 64, train=8, reps=3),
        _cavga("CAVGA-L_u 128 px (default)", "L", 128, 16, train=16, reps=3),
        _cavga("CAVGA-L_u 256 px (default)", "L", 256, 16, train=8, reps=3),
        _cavga("CAVGA-R_u 256 px, L's recipe", "R", 256, 16, train=8, reps=3, options=RECIPE_L),
        {"kind": "padim", "name": "PaDiM-style Lite0 256 px", "size": 256, "train_batch": 16, "infer_batch": 16,
         "reps": 3},
    ]  # fmt: skip


# --------------------------------------------------------------------------- measuring


def summary(rates: list[float]) -> dict:
    q1, median, q3 = np.percentile(rates, [25, 50, 75])
    return {"images_per_s": float(median), "q1": float(q1), "q3": float(q3), "n": len(rates)}


def latency_summary(ms: list[float]) -> dict:
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "n": len(ms)}


def interleaved(fns: dict, images: int, reps: int, warmup: int = 1) -> tuple[dict, dict, dict]:
    """Time each callable ``reps`` times, one call of each per round: images/s, seconds per call, failures."""
    failed: dict[str, str] = {}
    for name, fn in list(fns.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # a variant the machine or torch does not support: note it, go on
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            del fns[name]
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    rates = {name: summary([images / s for s in t]) for name, t in seconds.items()}
    return rates, seconds, failed


def _cavga_worker(spec: dict, bf16: bool, tmp: Path) -> dict:
    threads, setting = spec["threads"], spec["setting"]
    model = build(spec)
    size = spec["size"]
    train_images, infer_images = (
        torch.rand(spec["train_batch"], 3, size, size),
        torch.rand(spec["infer_batch"], 3, size, size),
    )
    batch = _batch(train_images, setting)
    result: dict = {"notes": []}
    # Peak RSS of one model's training and inference (the process's peak before the variants' copies exist).
    step, run = _trainer(model, setting, batch, "full"), _inferrer(model, setting, infer_images, "eager")
    for _ in range(2):
        step()
        run()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["flops_per_image"] = {
        "train": count_flops(step) / spec["train_batch"],
        "train_plain": count_flops(_trainer(model, setting, batch, "no_cam")) / spec["train_batch"],
        "infer": count_flops(run) / spec["infer_batch"],
    }
    del step, run
    modes = ["full", "no_cam", *(PAPER_TRAIN if spec["paper"] else ()), *(("bf16",) if bf16 else ())]
    trainers = {mode: _trainer(model, setting, batch, mode) for mode in modes}
    result["train"], _, failed = interleaved(trainers, spec["train_batch"], spec["reps"])
    result["notes"] += [f"train {name} skipped: {why}" for name, why in failed.items()]
    del trainers
    modes = ["eager", "plain", *(PAPER_INFER if spec["paper"] else ()), *(("bf16",) if bf16 else ())]
    inferrers = {mode: _inferrer(model, setting, infer_images, mode) for mode in modes}
    try:
        inferrers["onnx"] = _onnx_runner(model, infer_images, threads, tmp)
    except Exception as exc:
        result["notes"].append(f"onnx skipped: {type(exc).__name__}: {exc}")
    result["infer"], _, failed = interleaved(inferrers, spec["infer_batch"], spec["reps"] + 2)
    result["notes"] += [f"infer {name} skipped: {why}" for name, why in failed.items()]
    del inferrers
    # Per-image latency: batch 1, one thread (a line PC's view), eager, plain VAE, encoder alone, ONNX.
    torch.set_num_threads(1)
    one = infer_images[:1].clone()
    singles = {mode: _inferrer(model, setting, one, mode) for mode in ("eager", "plain", "encoder")}
    if "onnx" in result["infer"]:
        singles["onnx"] = _onnx_runner(model, one, 1, tmp)
    _, seconds, failed = interleaved(singles, 1, spec["latency_reps"], warmup=2)
    result["latency"] = {name: latency_summary([1000 * s for s in t]) for name, t in seconds.items()}
    torch.set_num_threads(threads)
    return result


def _padim_worker(spec: dict, tmp: Path) -> dict:
    threads, size = spec["threads"], spec["size"]
    fit_images, infer_images = (
        torch.rand(spec["train_batch"], 3, size, size),
        torch.rand(spec["infer_batch"], 3, size, size),
    )
    fits, runners = padim_paths(spec, fit_images, threads, tmp)
    run = runners["eager"](infer_images)
    fits["full"]()
    run()
    result: dict = {"notes": ["train = PaDiM's fit: features and the Gaussian's sums, per image (no gradients)"]}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["flops_per_image"] = {
        "train": count_flops(fits["full"]) / spec["train_batch"],
        "infer": count_flops(run) / spec["infer_batch"],
    }
    result["train"], _, _ = interleaved(fits, spec["train_batch"], spec["reps"])
    inferrers = {"eager": run, "onnx": runners["onnx"](infer_images, threads)}
    result["infer"], _, failed = interleaved(inferrers, spec["infer_batch"], spec["reps"] + 2)
    result["notes"] += [f"infer {name} skipped: {why}" for name, why in failed.items()]
    torch.set_num_threads(1)
    one = infer_images[:1].clone()
    singles = {"eager": runners["eager"](one), "onnx": runners["onnx"](one, 1)}
    _, seconds, _ = interleaved(singles, 1, spec["latency_reps"], warmup=2)
    result["latency"] = {name: latency_summary([1000 * s for s in t]) for name, t in seconds.items()}
    torch.set_num_threads(threads)
    return result


def worker(spec: dict) -> dict:
    """One configuration, measured in this process (its own peak RSS)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if spec["kind"] == "padim":
            return _padim_worker(spec, Path(tmp))
        return _cavga_worker(spec, spec["bf16"], Path(tmp))


def _last_json(command: list[str], timeout: float) -> dict:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"took longer than {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def anomalib_peer(python: str | None, threads: int, reps: int, latency_reps: int) -> dict:
    """anomalib's PaDiM timed by ``anomalib_padim.py`` under ``python`` (an interpreter that imports anomalib)."""
    if python is None:
        return {"skipped": "no interpreter with anomalib given (--anomalib-python; see benchmarks/anomalib_padim.py)"}
    check = subprocess.run([python, "-c", "import anomalib"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        return {"skipped": f"{python} cannot import anomalib"}
    command = [python, str(HERE / "anomalib_padim.py"), "--size", "256", "--threads", str(threads), "--batch", "16"]
    command += ["--reps", str(reps), "--latency-reps", str(latency_reps)]
    return {"name": "anomalib PaDiM ResNet-18 256 px", **_last_json(command, 1200)}


# --------------------------------------------------------------------------- report


def _ratio(results: dict, a: str, b: str) -> float | None:
    """How many times faster ``a`` runs than ``b`` (images/s medians)."""
    if a in results and b in results:
        return results[a]["images_per_s"] / results[b]["images_per_s"]
    return None


def _ms_ratio(latency: dict, a: str, b: str) -> float | None:
    """Latency of ``a`` over latency of ``b`` (batch 1 medians): above 1, ``a`` is slower."""
    if a in latency and b in latency:
        return latency[a]["median_ms"] / latency[b]["median_ms"]
    return None


def ratios(r: dict) -> dict:
    t, i, lat = r["train"], r["infer"], r["latency"]
    return {
        "train_map_overhead": _ratio(t, "no_cam", "full"),  # full step time / plain VAE-GAN step time
        "infer_map_overhead": _ratio(i, "plain", "eager"),  # infer_batch time / plain VAE forward time
        "latency_map_overhead": _ms_ratio(lat, "eager", "plain"),
        "onnx_vs_eager": _ratio(i, "onnx", "eager"),
        "onnx_vs_eager_batch1": _ms_ratio(lat, "eager", "onnx"),  # how many times faster ONNX is at batch 1
        "train_vs_before": _ratio(t, "full", "before"),
        "infer_vs_naive": _ratio(i, "eager", "naive"),
        "infer_vs_before": _ratio(i, "eager", "before"),
        "train_channels_last": _ratio(t, "channels_last", "full"),
        "infer_channels_last": _ratio(i, "channels_last", "eager"),
        "train_bf16": _ratio(t, "bf16", "full"),
        "infer_bf16": _ratio(i, "bf16", "eager"),
    }


def add_rates(c: dict, limits: dict) -> None:
    """GFLOP/s of training and inference and their fractions of the float32 (and bfloat16) peak."""
    peak32, peak16 = limits["float32"]["peak_gflops"], limits["bfloat16"]["peak_gflops"]
    for phase, variant in (("train", "full"), ("infer", "eager")):
        gflops = c[phase][variant]["images_per_s"] * c["flops_per_image"][phase] / 1e9
        c[f"{phase}_gflops"] = gflops
        c[f"{phase}_peak_fraction"] = gflops / peak32
        if "bf16" in c[phase]:
            c[f"{phase}_bf16_peak_fraction"] = (
                c[phase]["bf16"]["images_per_s"] * c["flops_per_image"][phase] / 1e9 / peak16
            )


TARGETS = (  # (key, what, the figure's direction, target): the speed targets, as ratios measured in one run
    ("latency_vs_anomalib_padim", "default model's per-image latency at 256 px / anomalib PaDiM's", "<", 1.0),
    ("infer_map_overhead", "default model's inference (map + score) / plain VAE forward, batch 16", "<=", 1.3),
    ("onnx_vs_eager_batch1", "default model: ONNX speed-up over eager at batch 1", ">=", 1.5),
    ("train_map_overhead", "default model's training step / plain VAE-GAN step", "<=", 1.3),
)


def targets(record: dict) -> list[dict]:
    by_name = {c["name"]: c for c in record["configs"] if "error" not in c}
    default = by_name.get("CAVGA-L_u 256 px (default)") or next(
        (c for c in record["configs"] if c.get("variant") == "L" and "error" not in c), None
    )
    if default is None:
        return []
    values = dict(default["ratios"])
    peer = record.get("anomalib", {})
    if "latency_ms" in peer and default["size"] == peer.get("size"):
        values["latency_vs_anomalib_padim"] = default["latency"]["eager"]["median_ms"] / peer["latency_ms"]["median"]
    out = []
    for key, what, direction, target in TARGETS:
        value = values.get(key)
        met = (
            None
            if value is None
            else (value < target if direction == "<" else value <= target if direction == "<=" else value >= target)
        )
        out.append(
            {
                "key": key,
                "what": what,
                "config": default["name"],
                "value": value,
                "target": f"{direction} {target}",
                "met": met,
            }
        )
    return out


def comparisons(record: dict) -> list[dict]:
    """The default model at 256 px against PaDiM on the same Lite0 features and against anomalib's PaDiM: its
    time over theirs (below 1: faster). These configurations ran one after another in the run, not interleaved."""
    by_name = {c["name"]: c for c in record["configs"] if "error" not in c}
    default, padim = by_name.get("CAVGA-L_u 256 px (default)"), by_name.get("PaDiM-style Lite0 256 px")
    peer = record.get("anomalib", {})
    out = []
    if default and padim:
        for mode in ("eager", "onnx"):
            value = default["latency"][mode]["median_ms"] / padim["latency"][mode]["median_ms"]
            out.append({"what": f"latency {mode}: default / PaDiM-style (Lite0)", "value": value})
        value = padim["infer"]["eager"]["images_per_s"] / default["infer"]["eager"]["images_per_s"]
        out.append({"what": "inference batch 16 eager: default time / PaDiM-style time", "value": value})
    if default and "latency_ms" in peer:
        for mode in ("eager", "onnx"):
            value = default["latency"][mode]["median_ms"] / peer["latency_ms"]["median"]
            out.append({"what": f"latency: default {mode} / anomalib PaDiM eager", "value": value})
    return out


def finish(record: dict) -> None:
    """Peaks, GFLOP/s and fractions, ratios, targets and comparisons, from the measured fields of ``record``."""
    with_peaks(record["limits"])
    for c in record["configs"]:
        if "error" not in c:
            if c["kind"] == "cavga":
                c["ratios"] = ratios(c)
            add_rates(c, record["limits"])
    record["targets"] = targets(record)
    record["comparisons"] = comparisons(record)


def _fmt(s: dict | None, digits: int = 1) -> str:
    return "-" if s is None else f"{s['images_per_s']:.{digits}f}"


def _ms(s: dict | None) -> str:
    return "-" if s is None else f"{s['median_ms']:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(record: dict) -> str:
    lim = record["limits"]
    f32, b16 = lim["float32"], lim["bfloat16"]
    lines = [
        f"threads {record['threads']} (latency: 1); load average at start / end {record['load_average'][0]:.2f} / "
        f"{record['load_average_end'][0]:.2f}; clock {lim['clock']['ghz']:.2f} GHz measured, "
        f"{lim['clock_used_ghz']:.2f} used; float32 peak {f32['peak_gflops']:.1f} GFLOP/s (kernels: "
        + ", ".join(f"{k} {v:.1f}" for k, v in f32["kernels_gflops"].items())
        + f"; FMA width x clock {f32['fma_width_x_clock_gflops'] or 0:.1f}); bfloat16 peak {b16['peak_gflops']:.1f} "
        f"({'native' if b16['native'] else 'emulated: no AVX-512 BF16'}; kernels "
        + ", ".join(f"{k} {v:.1f}" for k, v in b16["kernels_gflops"].items())
        + ")",
        "",
        "| config | train img/s (plain) | infer img/s eager / plain / ONNX | latency ms eager / plain / encoder / ONNX "
        "| train GFLOP/img | train % peak | infer % peak | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in record["configs"]:
        if "error" in c:
            lines.append(f"| {c['name']} | error: {c['error']} | | | | | | |")
            continue
        t, i, lat = c["train"], c["infer"], c["latency"]
        lines.append(
            f"| {c['name']} | {_fmt(t.get('full'))} ({_fmt(t.get('no_cam'))}) | {_fmt(i.get('eager'))} / "
            f"{_fmt(i.get('plain'))} / {_fmt(i.get('onnx'))} | {_ms(lat.get('eager'))} / {_ms(lat.get('plain'))} / "
            f"{_ms(lat.get('encoder'))} / {_ms(lat.get('onnx'))} | {c['flops_per_image']['train'] / 1e9:.2f} | "
            f"{100 * c['train_peak_fraction']:.0f} % | {100 * c['infer_peak_fraction']:.0f} % | "
            f"{c['peak_rss_mib']:.0f} |"
        )
    peer = record.get("anomalib", {})
    if "latency_ms" in peer:
        lines.append(
            f"| {peer['name']} (anomalib {peer['anomalib']}) | {peer['fit_images_per_s']:.1f} (fit) | "
            f"{peer['infer_images_per_s']:.1f} / - / - | {peer['latency_ms']['median']:.1f} / - / - / - | - | - | - | "
            f"{peer['peak_rss_mib']:.0f} |"
        )
    else:
        lines += ["", f"anomalib PaDiM: {peer.get('skipped') or peer.get('error')}"]
    lines += [
        "",
        "Ratios in this run (map overhead = time with the map / time of the plain VAE; x = times faster):",
        "",
        "| config | train map overhead | infer map overhead batch / batch 1 | ONNX vs eager batch / batch 1 "
        "| train vs before | infer vs naive | channels_last train / infer | bf16 train / infer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in record["configs"]:
        if "error" in c or "ratios" not in c:
            continue
        q = c["ratios"]
        lines.append(
            f"| {c['name']} | {_x(q['train_map_overhead'])} | {_x(q['infer_map_overhead'])} / "
            f"{_x(q['latency_map_overhead'])} | {_x(q['onnx_vs_eager'])} / {_x(q['onnx_vs_eager_batch1'])} | "
            f"{_x(q['train_vs_before'])} | {_x(q['infer_vs_naive'])} | {_x(q['train_channels_last'])} / "
            f"{_x(q['infer_channels_last'])} | {_x(q['train_bf16'])} / {_x(q['infer_bf16'])} |"
        )
    if record["comparisons"]:
        lines += ["", "| comparison (time / time) | value |", "|---|---|"]
        lines += [f"| {c['what']} | {c['value']:.2f} |" for c in record["comparisons"]]
    if record["targets"]:
        lines += ["", "| target | value | target | met |", "|---|---|---|---|"]
        for t in record["targets"]:
            value = "-" if t["value"] is None else f"{t['value']:.2f}"
            met = "not measured" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {t['what']} | {value} | {t['target']} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and widths, few repetitions (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # One thread by default: on a 2-core machine shared with other work, two OpenMP threads spin-wait on each
    # other and a tiny training step measured 5 ms with one thread and 40 ms to 2 s with two.
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)")
    parser.add_argument("--anomalib-python", default=os.environ.get("CAVGA_ANOMALIB_PYTHON"),
                        help="an interpreter that imports anomalib (default $CAVGA_ANOMALIB_PYTHON)")  # fmt: skip
    parser.add_argument("--report", type=Path, help="recompute the derived figures of a written JSON, print it")
    parser.add_argument("--configs", nargs="+", metavar="TEXT",
                        help="only the configurations whose name contains one of these (e.g. 'L_u 256')")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.report:
        record = json.loads(args.report.read_text())
        finish(record)
        print(table(record))
        args.report.write_text(json.dumps(record, indent=2) + "\n")
        return
    import onnxruntime as ort

    start = time.perf_counter()
    load = os.getloadavg()
    torch.set_num_threads(args.threads)
    print("limits ...", file=sys.stderr, flush=True)
    limits = machine_limits(args.threads, args.quick)
    bf16 = limits["bfloat16"]["native"]
    results = []
    chosen = [s for s in configs(args.quick) if not args.configs or any(t in s["name"] for t in args.configs)]
    for spec in chosen:
        spec = {**spec, "threads": args.threads, "bf16": bf16, "latency_reps": 5 if args.quick else 15}
        print(f"{spec['name']} ...", file=sys.stderr, flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        results.append({**spec, **_last_json(command, 120 if args.quick else 1800)})
    if args.quick:
        peer = {"skipped": "not with --quick (CI)"}
    else:
        print("anomalib PaDiM ...", file=sys.stderr, flush=True)
        peer = anomalib_peer(args.anomalib_python, args.threads, 3, 15)
    record = {
        "what": "CPU training and inference speed of untrained cavga models on random images (benchmarks/speed.py)",
        "quick": args.quick,
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(load),
        "load_average_end": list(os.getloadavg()),
        "limits": limits,
        "configs": results,
        "anomalib": peer,
    }
    finish(record)
    record["wall_s"] = time.perf_counter() - start
    print(table(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
