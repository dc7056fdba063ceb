"""The machine's limit for ``benchmarks/speed.py``: FLOPs of a callable, the clock, and a peak that holds.

The peak a model's FLOP rate is held against is the larger of two figures, both measured in the same run:

* the best of the kernels the models are made of (a float32 matmul, a 3x3 convolution, a depthwise 3x3 convolution
  as in EfficientNet-Lite0's blocks), each timed on ``threads`` threads, and
* the cores' documented FMA width times the measured clock: FLOP per cycle per core (an FMA is 2 FLOP per lane)
  x cycles per second x cores used.

A training step cannot beat the second figure; when a kernel beats it, the clock was measured low (a busy core)
and the kernel's rate is the limit instead. The same for bfloat16 (CPU autocast): cores with AVX-512 BF16 do two
bf16 products per float32 lane (``vdpbf16ps``); cores without it convert to float32 and are held to the float32
width.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, 2 per multiply-add;
the forward and, in a backward, the input and weight gradients it computes); ``tests/test_speed_benchmark.py``
checks the count against a hand count for a convolution and a transposed convolution.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Documented float32 FLOP per cycle per core (2 FMA pipes x lanes x 2), by (vendor, family); sources: AMD's
# software optimization guides for family 19h (Zen 3 and Zen 4: two 256-bit FMA pipes, AVX-512 in two halves)
# and 1Ah (Zen 5: two 512-bit FMA pipes).
FP32_FLOP_PER_CYCLE = {("AuthenticAMD", 25): 32, ("AuthenticAMD", 26): 64}
ADDS_PER_ITERATION = 8  # dependent 1-cycle adds in the clock loop below

_CLOCK_SOURCE = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    unsigned long x = 0;
    long n = 100000000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        /* a chain of dependent adds: one per cycle whatever the core, the loop counter runs beside it */
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                         "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
    printf("%.6f %lu\n", s, x);
    return 0;
}
"""


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def cpu_identity() -> dict:
    """Vendor, family, model, model name and flags of the first core (/proc/cpuinfo on Linux)."""
    info: dict = {"vendor": None, "family": None, "model": None, "model_name": platform.processor(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info.update(
        vendor=fields.get("vendor_id"),
        family=int(fields["cpu family"]) if "cpu family" in fields else None,
        model=int(fields["model"]) if fields.get("model", "").isdigit() else None,
        model_name=fields.get("model name", info["model_name"]),
        flags=fields.get("flags", "").split(),
        nominal_mhz=float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
    )
    return info


def measure_clock(repeats: int = 5) -> dict:
    """The core's clock from a chain of dependent integer adds (one per cycle), compiled with ``cc``: the fastest
    of ``repeats`` runs (a run that shared its core counts fewer cycles per second). Without a C compiler, or
    off x86-64, the clock /proc/cpuinfo reports."""
    cc = shutil.which("cc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        mhz = cpu_identity().get("nominal_mhz")
        return {"ghz": mhz / 1000 if mhz else None, "source": "/proc/cpuinfo (no C compiler or not x86-64)"}
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "clock.c", Path(tmp) / "clock"
        source.write_text(_CLOCK_SOURCE)
        subprocess.run([cc, "-O1", "-o", str(binary), str(source)], check=True, capture_output=True)
        rates = []
        for _ in range(repeats):
            seconds = float(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split()[0])
            rates.append(ADDS_PER_ITERATION * 1e8 / seconds / 1e9)
    return {"ghz": max(rates), "runs_ghz": rates, "source": "dependent-add loop (cc)"}


def documented_flop_per_cycle(cpu: dict) -> dict:
    """FLOP per cycle per core for float32 and bfloat16 from the table above and the bf16 flag; None if unknown."""
    fp32 = FP32_FLOP_PER_CYCLE.get((cpu.get("vendor"), cpu.get("family")))
    if fp32 is None:
        return {"float32": None, "bfloat16": None, "bf16_native": False}
    native = "avx512_bf16" in cpu.get("flags", [])
    return {"float32": fp32, "bfloat16": 2 * fp32 if native else fp32, "bf16_native": native}


def _rate(fn, flops: float, reps: int) -> float:
    fn()
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    return float(np.median(rates))


def kernel_rates(dtype: torch.dtype, quick: bool) -> dict:
    """GFLOP/s of a matmul, a 3x3 conv and a depthwise 3x3 conv in ``dtype`` (median of repetitions)."""
    n, reps = (512, 3) if quick else (2048, 7)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    side, channels = (16, 64) if quick else (64, 128)
    x = torch.randn(8, channels, side, side, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, dtype=dtype)
    wide = 4 * channels  # the depthwise convs of an inverted residual block run on the expanded width
    xd = torch.randn(8, wide, side, side, dtype=dtype)
    wd = torch.randn(wide, 1, 3, 3, dtype=dtype)
    with torch.inference_mode():
        return {
            "matmul": _rate(lambda: torch.mm(a, b), 2 * n**3, reps),
            "conv3x3": _rate(lambda: F.conv2d(x, w, padding=1), count_flops(lambda: F.conv2d(x, w, padding=1)), reps),
            "depthwise3x3": _rate(
                lambda: F.conv2d(xd, wd, padding=1, groups=wide),
                count_flops(lambda: F.conv2d(xd, wd, padding=1, groups=wide)),
                reps,
            ),
        }


def machine_limits(threads: int, quick: bool) -> dict:
    """Kernel rates and the documented FMA width x clock for float32 and bfloat16, and the peak of each."""
    cpu = cpu_identity()
    clock = measure_clock(3 if quick else 5)
    width = documented_flop_per_cycle(cpu)
    limits: dict = {
        "cpu": {k: cpu.get(k) for k in ("vendor", "family", "model", "model_name", "nominal_mhz")},
        "avx512f": "avx512f" in cpu["flags"],
        "avx512_bf16": "avx512_bf16" in cpu["flags"],
        "clock": clock,
        "cores": threads,
    }
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        # Emulated bf16 runs near 1 GFLOP/s: the small sizes tell its rate as well, in seconds instead of minutes.
        kernels = kernel_rates(dtype, quick or (name == "bfloat16" and not width["bf16_native"]))
        limits[name] = {"kernels_gflops": kernels, "flop_per_cycle_per_core": width[name]}
    limits["bfloat16"]["native"] = width["bf16_native"]
    return with_peaks(limits)


def with_peaks(limits: dict) -> dict:
    """Fill in the clock used, the FMA width x clock and the peak of each dtype from the measured fields.

    The clock used is the larger of the measured one and the one the kernel reports: on a core shared with
    other work the add loop gets only its share of the cycles, and a configuration timed when the load eased
    would then run above a limit taken from that share."""
    nominal = limits["cpu"].get("nominal_mhz")
    measured = limits["clock"]["ghz"]
    clocks = [c for c in (measured, nominal / 1000 if nominal else None) if c is not None]
    limits["clock_used_ghz"] = max(clocks) if clocks else None
    for name in ("float32", "bfloat16"):
        entry = limits[name]
        kernels, width = entry["kernels_gflops"], entry["flop_per_cycle_per_core"]
        theoretical = None
        if width is not None and limits["clock_used_ghz"] is not None:
            theoretical = width * limits["clock_used_ghz"] * limits["cores"]
        entry["best_kernel"] = max(kernels, key=kernels.get)
        entry["fma_width_x_clock_gflops"] = theoretical
        entry["peak_gflops"] = max(kernels[entry["best_kernel"]], theoretical or 0.0)
    return limits
