"""Load and fault test of ``cavga serve`` on loopback, bounded in count and time.

1. Load: the service runs in its own process (``cavga serve``, so its RSS is its own); ``--clients``
   threads, each on one keep-alive connection, send ``--requests`` PNG images in all to ``POST /predict``.
   Reported: throughput, p50/p99 latency, the count of 5xx answers (must be 0), the mean batch the worker ran,
   and the server's RSS after warm-up and after the load. Run once per ``--max-batch`` value, to show what
   batching concurrent requests gives.
2. Faults: ``--fault-rounds`` rounds of malformed bodies (empty, a truncated PNG, a 50 MB payload, a non-image,
   a decompression bomb, a multipart form without the ``image`` field), each followed by a good request whose
   answer must equal ``cavga.load(model).predict`` (score to 1e-6).

Without ``--model`` a tiny model is trained first on generated images (a minute on a CPU). Prints Markdown
tables and writes JSON:

    python benchmarks/serve_load.py [--model DIR] [--clients 8] [--requests 400] [--max-batch 1 8]
        [--out benchmarks/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

TIMEOUT_S = 60.0  # no single request of this benchmark may take longer


# ---------------------------------------------------------------- bodies
def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels: a few hundred kB that decode to side**2 pixels."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def multipart(fields: dict[str, bytes], boundary: str = "cavga-benchmark-boundary") -> tuple[bytes, str]:
    parts = []
    for name, data in fields.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def malformed_bodies(good_png: bytes, oversize_bytes: int, bomb_side: int = 20000) -> dict[str, tuple[bytes, str]]:
    """Bodies the service must refuse with a 4xx, each with its Content-Type."""
    form, form_type = multipart({"picture": good_png})
    return {
        "empty": (b"", "image/png"),
        "truncated PNG": (good_png[: len(good_png) // 2], "image/png"),
        f"{oversize_bytes / 2**20:.0f} MB payload": (b"\0" * oversize_bytes, "application/octet-stream"),
        "non-image": (b"this is a text file, not an image\n" * 20, "text/plain"),
        f"decompression bomb ({bomb_side}x{bomb_side})": (bomb_png(bomb_side), "image/png"),
        "multipart without 'image'": (form, form_type),
    }


# ---------------------------------------------------------------- client
def post(conn: http.client.HTTPConnection, path: str, body: bytes, content_type: str) -> tuple[int, dict]:
    """One request on ``conn``; a connection the server closed early reads as status 0 (the caller reconnects)."""
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        data = response.read()
    except (ConnectionError, http.client.HTTPException, OSError) as exc:
        conn.close()
        return 0, {"error": f"{type(exc).__name__}: {exc}"}
    try:
        return response.status, json.loads(data)
    except json.JSONDecodeError:
        return response.status, {"error": data[:200].decode(errors="replace")}


def _connection(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)


def rss_mb(pid: int) -> dict[str, float | None]:
    """Resident and peak resident memory of ``pid`` in MB (Linux /proc; None elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return {"rss": None, "peak": None}
    return {k: int(fields[key].split()[0]) / 1024 for k, key in (("rss", "VmRSS"), ("peak", "VmHWM"))}


class ServerProcess:
    """``cavga serve`` (``python -m cavga.cli serve``) on a free loopback port; stopped and waited for on exit."""

    def __init__(self, model: Path, *args: str) -> None:
        command = [sys.executable, "-m", "cavga.cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if " on http://" not in line:
            self.process.kill()
            raise RuntimeError(f"the server did not start: {line}{self.process.stderr.read()}")
        self.url = line.strip().rsplit(" on ", 1)[1]

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------- phases
def load_phase(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    statuses: list[int] = []
    scores: list[tuple[int, float]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = _connection(url)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            status, body = post(conn, "/predict", images[i % len(images)], "image/png")
            elapsed = time.perf_counter() - start
            if status == 0:
                conn = _connection(url)
            with lock:
                latencies.append(elapsed)
                statuses.append(status)
                if status == 200:
                    scores.append((i % len(images), body["pred_score"]))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": requests,
        "seconds": round(wall, 3),
        "throughput": round(requests / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "n_200": statuses.count(200),
        "n_5xx": sum(1 for s in statuses if s >= 500),
        "n_other": sum(1 for s in statuses if s != 200 and s < 500),
        "scores": scores,
    }


def fault_phase(url: str, good: bytes, good_score: float, bodies: dict, rounds: int) -> dict:
    results: dict[str, dict] = {name: {"statuses": [], "error": None} for name in bodies}
    good_ok = good_total = 0
    conn = _connection(url)
    for _ in range(rounds):
        for name, (body, content_type) in bodies.items():
            status, answer = post(conn, "/predict", body, content_type)
            if status == 0:
                conn = _connection(url)
            results[name]["statuses"].append(status)
            results[name]["error"] = answer.get("error")
            status, answer = post(conn, "/predict", good, "image/png")
            good_total += 1
            good_ok += status == 200 and abs(answer["pred_score"] - good_score) <= 1e-6
    conn.close()
    return {"bodies": results, "good_requests": good_total, "good_correct": good_ok}


# ---------------------------------------------------------------- setup
def tiny_model(root: Path, image_size: int, width: int | None, epochs: int) -> Path:
    import cavga

    rng = np.random.default_rng(0)
    train = root / "data" / "normal"
    train.mkdir(parents=True)
    for i in range(16):
        pixels = np.clip(120 + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(train / f"{i:03d}.png")
    options = {"width": width} if width else {}
    model = cavga.Cavga("D", image_size=image_size, epochs=epochs, **options).fit(root / "data", progress=False)
    return model.save(root / "model")


def request_images(n: int, side: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    images = []
    for _ in range(n):
        pixels = np.clip(120 + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
        y, x = rng.integers(0, side // 2, 2)
        pixels[y : y + side // 4, x : x + side // 4] = (230, 40, 40)  # a defect-like patch
        images.append(png_bytes(pixels))
    return images


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "-")) for _, key in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="saved model (default: train a tiny one)")
    p.add_argument("--image-size", type=int, default=64, help="of the tiny model")
    p.add_argument("--width", type=int, default=None, help="of the tiny model (default: cavga's)")
    p.add_argument("--epochs", type=int, default=1, help="of the tiny model")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="one load run per value")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="server torch threads")
    p.add_argument("--request-side", type=int, default=256, help="side of the PNGs sent, in pixels")
    p.add_argument("--fault-rounds", type=int, default=3)
    p.add_argument("--oversize-mb", type=float, default=50.0)
    p.add_argument("--bomb-side", type=int, default=20000)
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = p.parse_args(argv)

    import cavga

    with tempfile.TemporaryDirectory(prefix="cavga-serve-load-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        model_dir = args.model or tiny_model(tmp, args.image_size, args.width, args.epochs)
        setup_s = time.perf_counter() - start
        images = request_images(8, args.request_side)
        paths = []
        for i, data in enumerate(images):
            paths.append(tmp / f"request_{i}.png")
            paths[-1].write_bytes(data)
        reference = [pred.pred_score for pred in cavga.load(model_dir, device="cpu").predict(paths)]
        model_info = json.loads((Path(model_dir) / "config.json").read_text())["model"]

        load_rows = []
        faults = None
        for max_batch in args.max_batch:
            server_args = ["--threads", str(args.threads), "--max-batch", str(max_batch), "--device", "cpu"]
            with ServerProcess(model_dir, *server_args) as server:
                warm = _connection(server.url)
                for data in images:
                    post(warm, "/predict", data, "image/png")
                warm.close()
                before = rss_mb(server.process.pid)
                result = load_phase(server.url, images, args.clients, args.requests)
                after = rss_mb(server.process.pid)
                health = json.loads(_get(server.url, "/health"))
                wrong = sum(1 for i, s in result.pop("scores") if abs(s - reference[i]) > 1e-6)
                load_rows.append(
                    {
                        "max_batch": max_batch,
                        **result,
                        "wrong_scores": wrong,
                        "mean_batch": health["mean_batch"],
                        "rss_before_mb": _round(before["rss"]),
                        "rss_after_mb": _round(after["rss"]),
                        "rss_peak_mb": _round(after["peak"]),
                    }
                )
                if max_batch == args.max_batch[-1]:
                    bodies = malformed_bodies(images[0], int(args.oversize_mb * 2**20), args.bomb_side)
                    faults = fault_phase(server.url, images[0], reference[0], bodies, args.fault_rounds)
                    faults["rss_after_mb"] = _round(rss_mb(server.process.pid)["rss"])
                    faults["server_alive"] = server.process.poll() is None

    columns = [
        ("max batch", "max_batch"),
        ("clients", "clients"),
        ("requests", "requests"),
        ("images/s", "throughput"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("5xx", "n_5xx"),
        ("wrong scores", "wrong_scores"),
        ("mean batch", "mean_batch"),
        ("RSS before MB", "rss_before_mb"),
        ("RSS after MB", "rss_after_mb"),
    ]
    print(
        f"cavga serve, CAVGA-{model_info['variant']} {model_info['image_size']} px (width {model_info['width']}), "
        f"{args.request_side} px PNG requests, {args.threads} torch threads, {platform.processor() or 'cpu'}"
    )
    print(table(load_rows, columns))
    fault_rows = [
        {"body": name, "status": ",".join(map(str, r["statuses"])), "error": (r["error"] or "")[:90]}
        for name, r in faults["bodies"].items()
    ]
    print()
    print(table(fault_rows, [("malformed body", "body"), ("status", "status"), ("message", "error")]))
    print(
        f"\ngood requests interleaved: {faults['good_correct']}/{faults['good_requests']} answered correctly; "
        f"server alive: {faults['server_alive']}; RSS after the faults: {faults['rss_after_mb']} MB"
    )
    result = {
        "model": model_info,
        "request_side": args.request_side,
        "threads": args.threads,
        "setup_seconds": round(setup_s, 1),
        "load": load_rows,
        "faults": faults,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    ok = all(row["n_5xx"] == 0 and row["wrong_scores"] == 0 for row in load_rows)
    ok = ok and faults["good_correct"] == faults["good_requests"] and faults["server_alive"]
    ok = ok and all(all(400 <= s < 500 for s in r["statuses"]) for r in faults["bodies"].values())
    return 0 if ok else 1


def _get(url: str, path: str) -> bytes:
    conn = _connection(url)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


if __name__ == "__main__":
    sys.exit(main())
