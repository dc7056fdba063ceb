"""The residual decoder (CAVGA-L's and CAVGA-R's) with its activations in torch's default layout (NCHW) against
channels-last (NHWC), the layout ``ResidualDecoder.forward`` uses: forward, and forward + backward (a training
step's share), on the CPU, timed alternately in one process so that the ratio shares the machine's state.

Shapes: the one-class default (64 px, batch 32, latent 64 x 8 x 8, width 16: what `cavga benchmark oneclass`
trains and scores ten times) and the 256 px CAVGA-L (batch 8, latent 64 x 32 x 32, width 16). Random weights and
inputs (speed does not depend on the values); the largest difference between the two layouts' outputs is printed
beside (float rounding). Prints a Markdown table and writes JSON::

    python benchmarks/decoder_layout.py [--threads 1 2] [--repeats 15] [--out benchmarks/results/decoder_layout.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cavga.model.networks import ResidualDecoder

# name: (batch, latent channels, latent side, width, blocks)
SHAPES = {"one-class L, 64 px, batch 32": (32, 64, 8, 8, 16, 3), "L, 256 px, batch 8": (8, 64, 32, 32, 16, 3)}


class _NchwDecoder(torch.nn.Module):
    """The same decoder run with its activations in the default layout (what it did before)."""

    def __init__(self, decoder: ResidualDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.to_image(self.decoder.blocks(z))


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def measure(shape: tuple, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, channels, height, width_px, width, blocks = shape
    decoder = ResidualDecoder(channels, 3, width, blocks)
    nchw = _NchwDecoder(decoder)
    z = torch.randn(batch, channels, height, width_px)
    with torch.no_grad():
        difference = float((decoder(z) - nchw(z)).abs().max())

    def forward(module):
        def run() -> None:
            with torch.no_grad():
                module(z)

        return run

    def training(module):
        leaf = z.clone().requires_grad_(True)

        def run() -> None:
            module(leaf).square().mean().backward()

        return run

    runs = {
        ("forward", "nchw"): forward(nchw),
        ("forward", "channels_last"): forward(decoder),
        ("forward+backward", "nchw"): training(nchw),
        ("forward+backward", "channels_last"): training(decoder),
    }
    for fn in runs.values():  # warm-up
        fn()
        fn()
    times: dict = {key: [] for key in runs}
    for _ in range(repeats):  # alternately: one run of each per round
        for key, fn in runs.items():
            times[key].append(_once(fn))
    row: dict = {"threads": threads, "max_abs_difference": difference}
    for step in ("forward", "forward+backward"):
        before, after = statistics.median(times[(step, "nchw")]), statistics.median(times[(step, "channels_last")])
        row[step] = {"nchw_ms": before, "channels_last_ms": after, "speedup": before / after}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    rows = []
    for name in args.shapes:
        for threads in args.threads:
            rows.append({"shape": name, "dims": SHAPES[name], **measure(SHAPES[name], threads, args.repeats)})
    lines = [
        "| shape | threads | forward ms NCHW / NHWC | speedup | fwd+bwd ms NCHW / NHWC | speedup | max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, t = r["forward"], r["forward+backward"]
        lines.append(
            f"| {r['shape']} | {r['threads']} | {f['nchw_ms']:.1f} / {f['channels_last_ms']:.1f} | "
            f"{f['speedup']:.2f} | {t['nchw_ms']:.1f} / {t['channels_last_ms']:.1f} | {t['speedup']:.2f} | "
            f"{r['max_abs_difference']:.1e} |"
        )
    print("\n".join(lines))
    if args.out is not None:
        document = {
            "command": " ".join(["python benchmarks/decoder_layout.py", *(sys.argv[1:] if argv is None else argv)]),
            "torch": torch.__version__,
            "machine": platform.platform(),
            "processor": platform.processor(),
            "repeats": args.repeats,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
