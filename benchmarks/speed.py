"""How fast CAVGA trains and infers on this machine, and how close that is to the machine's own float32 limit.

For CAVGA-D (32, 64 px) and CAVGA-R (128, 256 px), settings u and w, each configuration in its own subprocess
(so its peak RSS is its own): training images/s of the full ``training_step`` (encoder, decoder, discriminator,
attention loss, both optimizers), inference images/s of ``infer_batch`` (score + anomaly map) and of the exported
ONNX graph, FLOPs per image counted with ``torch.utils.flop_counter.FlopCounterMode``, achieved GFLOP/s beside
a float32 matmul peak timed in the same run. Variants are timed interleaved (one call of each per repetition) so
that their ratios share the machine's state:

* train: ``full`` (the library as it is), ``no_cam`` (attention weight 0 and the attention map not computed),
  ``before`` (autograd Grad-CAM with its double backward, D weight gradients in the generator's backward: the
  code before the closed-form optimization), ``channels_last``, ``bf16`` (CPU autocast).
* infer: ``eager`` (``infer_batch``), ``before`` (autograd Grad-CAM), ``naive`` (the public re-implementations'
  way, written here: a forward hook keeps the feature map, a tensor hook its gradient, one backward per image),
  ``channels_last``, ``bf16``, ``onnx`` (onnxruntime, closed-form graph from ``cavga.export``).
* ``torch.compile`` of the model's forward for CAVGA-D_u 64 px (full mode only; its own subprocess with a time
  limit; skipped with a note when it fails or takes too long).

Untrained models (speed does not depend on the weights), random images. Prints a Markdown table, writes JSON.

    python benchmarks/speed.py [--quick] [--out benchmarks/results/speed.json] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
import torch.nn.functional as F

from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import Batch
from cavga.engine import infer, train
from cavga.engine.infer import aggregate_score, infer_batch, residual_map
from cavga.model import gradcam
from cavga.model.networks import build_model

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "speed.json"

# (variant, image size, width, train batch, infer batch, repetitions)
FULL = [("D", 32, 64, 16, 16, 7), ("D", 64, 64, 16, 16, 7), ("R", 128, 64, 8, 8, 5), ("R", 256, 64, 4, 4, 3)]
QUICK = [("D", 32, 8, 4, 4, 3), ("R", 64, 8, 2, 2, 2)]  # CAVGA-R_w is left out of --quick (CI time)
TRAIN_VARIANTS = ("full", "no_cam", "before", "channels_last", "bf16")
INFER_VARIANTS = ("eager", "before", "naive", "channels_last", "bf16", "onnx")
COMPILE_LIMIT_S = 300


# --------------------------------------------------------------------------- code paths compared


@contextlib.contextmanager
def before_optimizations():
    """The code paths the optimizations replaced: autograd Grad-CAM everywhere (double backward in training,
    a backward at inference) and D weight gradients computed in the generator's backward."""
    saved = gradcam.closed_form_weights, gradcam.has_closed_form, infer.has_closed_form, train._frozen
    gradcam.closed_form_weights = lambda *a, **k: None
    gradcam.has_closed_form = infer.has_closed_form = lambda *a, **k: False
    train._frozen = lambda module: contextlib.nullcontext()
    try:
        yield
    finally:
        gradcam.closed_form_weights, gradcam.has_closed_form, infer.has_closed_form, train._frozen = saved


@contextlib.contextmanager
def without_attention():
    """Attention maps replaced by zeros (no Grad-CAM work); used with attention weights 0."""
    saved = train.output_attention, train.class_attention

    def zeros(model, out, *args, **kwargs):
        return torch.zeros(out.x_hat_logits.shape[0], 1, *out.x_hat_logits.shape[-2:])

    train.output_attention = train.class_attention = zeros
    try:
        yield
    finally:
        train.output_attention, train.class_attention = saved


def naive_infer(model, images: torch.Tensor, setting: str) -> tuple[np.ndarray, np.ndarray]:
    """Inference as public re-implementations write it: per image, hooks capture the feature map and its
    gradient, a full backward (into the parameters too) gives Grad-CAM's weights. Returns (scores, maps)."""
    model.eval()
    store: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        features = output[0] if isinstance(output, tuple) else output
        store["features"] = features
        features.register_hook(lambda grad: store.__setitem__("grad", grad))

    handle = model.encoder.register_forward_hook(keep)
    scores, maps = [], []
    try:
        for i in range(images.shape[0]):
            x = images[i : i + 1]
            model.zero_grad()
            with torch.enable_grad():
                out = model(x, sample=False)
                if setting == "u":
                    features = store["features"]
                    out.mu.sum().backward()
                    grad = store["grad"]
                else:
                    z = out.z
                    z.retain_grad()
                    logits = model.classify(z)
                    logits[0, 1].backward()
                    features, grad = z, z.grad
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((alpha * features).sum(1, keepdim=True)).detach()
            cam = cam / (cam.max() + 1e-8)
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x_hat = torch.sigmoid(out.x_hat_logits.detach())
            if setting == "u":
                scores.append(float(aggregate_score(x, x_hat, residual_map(x, x_hat), model.config)[0]))
                maps.append((1 - cam)[0, 0].numpy())
            else:
                scores.append(float(torch.softmax(logits.detach(), 1)[0, 1]))
                maps.append(cam[0, 0].numpy())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return np.array(scores), np.stack(maps)


# --------------------------------------------------------------------------- measuring


def summary(rates: list[float]) -> dict:
    q1, median, q3 = np.percentile(rates, [25, 50, 75])
    return {"images_per_s": float(median), "q1": float(q1), "q3": float(q3), "n": len(rates)}


def interleaved(fns: dict, images: int, reps: int, warmup: int = 1) -> tuple[dict, dict]:
    """Time each callable ``reps`` times, one call of each per round; images/s summaries and failures."""
    failed: dict[str, str] = {}
    for name, fn in list(fns.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # a variant the machine or torch does not support: note it, go on
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            del fns[name]
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            rates[name].append(images / (time.perf_counter() - start))
    return {name: summary(r) for name, r in rates.items()}, failed


def matmul_peak(n: int, reps: int) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    q1, median, q3 = np.percentile(rates, [25, 50, 75])
    return {"n": n, "gflops": float(median), "q1": float(q1), "q3": float(q3), "reps": reps}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _batch(images: torch.Tensor, setting: str) -> Batch:
    b = images.shape[0]
    labels = torch.zeros(b, dtype=torch.long)
    if setting == "w":
        labels[-1] = 1  # one labelled anomalous image per batch (CAVGA_w)
    masks = torch.zeros(b, 1, *images.shape[-2:])
    return Batch(images, masks, torch.zeros(b, dtype=torch.bool), labels, ["good"] * b, [""] * b)


def _model_config(variant: str, size: int, width: int, setting: str) -> ModelConfig:
    return ModelConfig(variant=variant, image_size=size, width=width, setting=setting)


def _trainer(model, setting: str, batch: Batch, mode: str):
    """A closure running one training step of ``mode`` on its own copy of the model and optimizers."""
    model = copy.deepcopy(model).train()
    if mode == "compiled":
        model.compile()  # after the copy: a deep copy of a compiled module runs eager
    config = TrainConfig()
    if mode == "no_cam":
        config.weights.w_ae = config.weights.w_cga = 0.0
    weights = torch.tensor([0.6, 2.0]) if setting == "w" else None
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        batch = _batch(batch.images.contiguous(memory_format=torch.channels_last), setting)
    opt_g, opt_d = train.make_optimizers(model, config)
    context = {
        "no_cam": without_attention,
        "before": before_optimizations,
        "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }.get(mode, contextlib.nullcontext)

    def step() -> None:
        with context():
            train.training_step(model, batch, opt_g, opt_d, config, weights)

    return step


def _inferrer(model, setting: str, images: torch.Tensor, mode: str):
    model = copy.deepcopy(model).eval()
    if mode == "compiled":
        model.compile()  # after the copy: a deep copy of a compiled module runs eager
    if mode == "naive":
        return lambda: naive_infer(model, images, setting)
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    context = {
        "before": before_optimizations,
        "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }.get(mode, contextlib.nullcontext)

    def run() -> None:
        with context():
            infer_batch(model, images)

    return run


def _onnx_runner(model, setting: str, images: torch.Tensor, threads: int, tmp: Path):
    import onnxruntime as ort

    from cavga.export import export

    sys.path.insert(0, str(HERE))
    from latency import _detector  # the eager-vs-ONNX latency script's untrained detector

    cfg = model.config
    detector = _detector({"variant": cfg.variant, "image_size": cfg.image_size, "width": cfg.width})
    detector.model_config = cfg
    detector.model_ = copy.deepcopy(model).eval()
    detector.train_config = TrainConfig()
    path = export(detector, tmp / "model.onnx", "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": images.numpy()}
    return lambda: session.run(None, feed)


def worker(spec: dict) -> dict:
    """One configuration, measured in this process (its own peak RSS)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    variant, size, width, setting = spec["variant"], spec["size"], spec["width"], spec["setting"]
    model = build_model(_model_config(variant, size, width, setting))
    train_images = torch.rand(spec["train_batch"], 3, size, size)
    infer_images = torch.rand(spec["infer_batch"], 3, size, size)
    batch = _batch(train_images, setting)
    result: dict = {"notes": []}

    # Peak RSS of one model's training and inference (the process's peak before the variants' copies exist).
    step, run = _trainer(model, setting, batch, "full"), _inferrer(model, setting, infer_images, "eager")
    for _ in range(2):
        step()
        run()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    del step, run

    result["flops_per_image"] = {
        "train": count_flops(_trainer(model, setting, batch, "full")) / spec["train_batch"],
        "infer": count_flops(_inferrer(model, setting, infer_images, "eager")) / spec["infer_batch"],
        "train_before": count_flops(_trainer(model, setting, batch, "before")) / spec["train_batch"],
    }

    trainers = {mode: _trainer(model, setting, batch, mode) for mode in TRAIN_VARIANTS}
    result["train"], failed = interleaved(trainers, spec["train_batch"], spec["reps"])
    result["notes"] += [f"train {name} skipped: {why}" for name, why in failed.items()]

    with tempfile.TemporaryDirectory() as tmp:
        inferrers = {mode: _inferrer(model, setting, infer_images, mode) for mode in INFER_VARIANTS if mode != "onnx"}
        try:
            inferrers["onnx"] = _onnx_runner(model, setting, infer_images, spec["threads"], Path(tmp))
        except Exception as exc:
            result["notes"].append(f"onnx skipped: {type(exc).__name__}: {exc}")
        result["infer"], failed = interleaved(inferrers, spec["infer_batch"], spec["reps"] + 2)
    result["notes"] += [f"infer {name} skipped: {why}" for name, why in failed.items()]
    return result


def compile_worker(spec: dict) -> dict:
    """torch.compile of the model (its forward; D and the optimizers stay eager) vs eager, inference and training."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    setting, size = spec["setting"], spec["size"]
    model = build_model(_model_config(spec["variant"], size, spec["width"], setting))
    images = torch.rand(spec["infer_batch"], 3, size, size)
    batch = _batch(torch.rand(spec["train_batch"], 3, size, size), setting)
    compiled_infer = _inferrer(model, setting, images, "compiled")
    start = time.perf_counter()
    compiled_infer()  # the first call compiles
    infer_compile_s = time.perf_counter() - start
    infer_rates, failed = interleaved(
        {
            "eager": _inferrer(model, setting, images, "eager"),
            "compiled": compiled_infer,
        },
        spec["infer_batch"],
        spec["reps"],
    )
    compiled_step = _trainer(model, setting, batch, "compiled")
    start = time.perf_counter()
    compiled_step()
    train_compile_s = time.perf_counter() - start
    train_rates, failed_t = interleaved(
        {"eager": _trainer(model, setting, batch, "full"), "compiled": compiled_step}, spec["train_batch"], spec["reps"]
    )
    return {
        "infer": infer_rates,
        "train": train_rates,
        "compile_s": {"infer": infer_compile_s, "train": train_compile_s},
        "notes": [f"{k}: {v}" for k, v in {**failed, **failed_t}.items()],
    }


def _run_worker(spec: dict, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"took longer than {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def _ratio(results: dict, a: str, b: str) -> float | None:
    """How many times faster ``a`` runs than ``b`` (images/s medians)."""
    if a in results and b in results:
        return results[a]["images_per_s"] / results[b]["images_per_s"]
    return None


def ratios(r: dict) -> dict:
    t, i = r["train"], r["infer"]
    return {
        "gradcam_overhead": _ratio(t, "no_cam", "full"),  # full step time / step without attention
        "gradcam_overhead_before": _ratio(t, "no_cam", "before"),
        "train_speedup_vs_before": _ratio(t, "full", "before"),
        "train_channels_last": _ratio(t, "channels_last", "full"),
        "train_bf16": _ratio(t, "bf16", "full"),
        "infer_vs_naive": _ratio(i, "eager", "naive"),
        "infer_speedup_vs_before": _ratio(i, "eager", "before"),
        "infer_channels_last": _ratio(i, "channels_last", "eager"),
        "infer_bf16": _ratio(i, "bf16", "eager"),
        "onnx_vs_eager": _ratio(i, "onnx", "eager"),
    }


def _fmt(summary_: dict | None) -> str:
    if summary_ is None:
        return "-"
    return f"{summary_['images_per_s']:.1f} ({summary_['q1']:.1f}-{summary_['q3']:.1f})"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(record: dict) -> str:
    peak = record["matmul_peak"]["gflops"]
    lines = [
        f"threads: {record['threads']}; float32 matmul peak {peak:.1f} GFLOP/s "
        f"(n={record['matmul_peak']['n']}); images/s median (IQR)",
        "",
        "| config | train img/s | infer img/s eager | infer img/s ONNX | train GFLOP/img | infer GFLOP/img "
        "| train GFLOP/s (% peak) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in record["configs"]:
        if "error" in c:
            lines.append(f"| {c['name']} | error: {c['error']} | | | | | | |")
            continue
        lines.append(
            f"| {c['name']} | {_fmt(c['train'].get('full'))} | {_fmt(c['infer'].get('eager'))} | "
            f"{_fmt(c['infer'].get('onnx'))} | {c['flops_per_image']['train'] / 1e9:.3f} | "
            f"{c['flops_per_image']['infer'] / 1e9:.3f} | {c['train_gflops']:.1f} "
            f"({100 * c['train_peak_fraction']:.0f} %) | {c['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Ratios (x = times faster; Grad-CAM overhead = full step time / step without attention):",
        "",
        "| config | Grad-CAM overhead (before) | train vs before | infer vs naive | infer vs before "
        "| ONNX vs eager | channels_last train / infer | bf16 train / infer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in record["configs"]:
        if "error" in c:
            continue
        q = c["ratios"]
        lines.append(
            f"| {c['name']} | {_x(q['gradcam_overhead'])} ({_x(q['gradcam_overhead_before'])}) | "
            f"{_x(q['train_speedup_vs_before'])} | {_x(q['infer_vs_naive'])} | {_x(q['infer_speedup_vs_before'])} | "
            f"{_x(q['onnx_vs_eager'])} | {_x(q['train_channels_last'])} / {_x(q['infer_channels_last'])} | "
            f"{_x(q['train_bf16'])} / {_x(q['infer_bf16'])} |"
        )
    comp = record.get("compile")
    if comp:
        if "error" in comp:
            lines += ["", f"torch.compile: skipped ({comp['error']})"]
        else:
            lines += [
                "",
                f"torch.compile ({comp['name']}): inference {_x(_ratio(comp['infer'], 'compiled', 'eager'))}, "
                f"training {_x(_ratio(comp['train'], 'compiled', 'eager'))} vs eager; compile took "
                f"{comp['compile_s']['infer']:.0f} s + {comp['compile_s']['train']:.0f} s",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and widths, few repetitions (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # One thread by default: on a 2-core machine shared with other work, two OpenMP threads spin-wait on each
    # other and a tiny training step measured 5 ms with one thread and 40 ms to 2 s with two.
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--compile-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.compile_worker:
        print(json.dumps(compile_worker(json.loads(args.compile_worker))))
        return

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    peak = matmul_peak(512 if args.quick else 2048, 5 if args.quick else 10)
    configs = []
    for variant, size, width, train_batch, infer_batch_size, reps in QUICK if args.quick else FULL:
        for setting in ("u", "w") if not (args.quick and variant == "R") else ("u",):
            name = f"CAVGA-{variant}_{setting} {size} px"
            spec = {
                "variant": variant,
                "size": size,
                "width": width,
                "setting": setting,
                "train_batch": train_batch,
                "infer_batch": infer_batch_size,
                "reps": reps,
                "threads": args.threads,
            }
            print(f"{name} ...", file=sys.stderr, flush=True)
            result = {"name": name, **spec, **_run_worker(spec, 120 if args.quick else 1800)}
            if "error" not in result:
                result["ratios"] = ratios(result)
                full = result["train"]["full"]["images_per_s"]
                result["train_gflops"] = full * result["flops_per_image"]["train"] / 1e9
                result["train_peak_fraction"] = result["train_gflops"] / peak["gflops"]
                result["infer_gflops"] = (
                    result["infer"]["eager"]["images_per_s"] * result["flops_per_image"]["infer"] / 1e9
                )
            configs.append(result)
    record = {
        "what": "CPU training and inference speed of untrained CAVGA models on random images (benchmarks/speed.py)",
        "quick": args.quick,
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "matmul_peak": peak,
        "configs": configs,
    }
    if not args.quick:
        spec = {**{k: configs[2][k] for k in ("variant", "size", "width", "setting", "train_batch", "infer_batch")}}
        spec.update(reps=5, threads=args.threads)
        print("torch.compile ...", file=sys.stderr, flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--compile-worker", json.dumps(spec)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_LIMIT_S, check=False)
            if done.returncode == 0:
                record["compile"] = {"name": configs[2]["name"], **json.loads(done.stdout.strip().splitlines()[-1])}
            else:
                record["compile"] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        except subprocess.TimeoutExpired:
            record["compile"] = {"error": f"compiling and timing took longer than {COMPILE_LIMIT_S} s"}
    print(table(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
