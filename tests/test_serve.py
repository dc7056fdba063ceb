"""cavga.serve: answers equal to ``Cavga.predict``, a 4xx for every malformed body while good requests go on being
answered, 503 from a full queue, batching of concurrent requests, and the load benchmark's files.

Servers run on 127.0.0.1 at a free port, on a thread of the test process, and are stopped by the fixtures."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cavga
from cavga.serve import ServeOptions, Service, start_server
from tiny_data import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 256 * 1024
MAX_PIXELS = 1_000_000


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("cavga_serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def images(model_dir) -> list[Path]:
    data = model_dir.parent / "data" / "bottle" / "test"
    gray = model_dir.parent / "gray.png"
    Image.open(data / "spot" / "001.png").convert("L").resize((50, 30)).save(gray)
    return sorted(data.glob("*/*.png"))[:4] + [gray]


@pytest.fixture(scope="module")
def reference(model_dir, images) -> list[cavga.Prediction]:
    return cavga.load(model_dir, device="cpu").predict(images)


@pytest.fixture(scope="module")
def server(model_dir):
    service = Service(model_dir, ServeOptions(max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, device="cpu"))
    with start_server(service) as running:
        yield running


def request(url: str, method: str, path: str, body: bytes | None = None, content_type: str = "image/png"):
    conn = bench._connection(url)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.headers
    finally:
        conn.close()


def predict(url: str, data: bytes, query: str = "", content_type: str = "image/png"):
    status, body, _ = request(url, "POST", "/predict" + query, data, content_type)
    return status, body


def decode_array(field: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(field["data"]), dtype=np.dtype(field["dtype"]).newbyteorder("<")).reshape(
        field["shape"]
    )


def assert_matches(answer: dict, expected: cavga.Prediction) -> None:
    assert answer["pred_score"] == pytest.approx(expected.pred_score, abs=1e-6)
    assert answer["raw_score"] == pytest.approx(expected.raw_score, abs=1e-6)
    assert answer["pred_label"] == expected.pred_label
    assert not {"score", "label", "mask"} & set(answer)  # anomalib's names only
    assert answer["image_size"] == list(expected.original_size)


def test_predict_equals_the_library(server, images, reference):
    for path, expected in zip(images, reference, strict=True):
        status, answer = predict(server.url, path.read_bytes(), "?maps=raw")
        assert status == 200, answer
        assert_matches(answer, expected)
        np.testing.assert_allclose(decode_array(answer["anomaly_map"]), expected.anomaly_map, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(decode_array(answer["pred_mask"]).astype(bool), expected.pred_mask)
        assert answer["threshold"] == 0.5
        assert answer["model_id"].startswith("sha256:")


def test_multipart_field_and_png_maps(server, images, reference):
    form, content_type = bench.multipart({"image": images[0].read_bytes()})
    status, answer = predict(server.url, form, "?maps=png", content_type)
    assert status == 200, answer
    assert_matches(answer, reference[0])
    amap = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["anomaly_map_png"]))))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["pred_mask_png"]))))
    np.testing.assert_array_equal(amap, np.round(reference[0].anomaly_map * 255).astype(np.uint8))
    np.testing.assert_array_equal(mask > 0, reference[0].pred_mask)
    status, answer = predict(server.url, images[0].read_bytes())
    assert "anomaly_map" not in answer and "anomaly_map_png" not in answer


def test_health_and_model_info(server, model_dir):
    status, health, _ = request(server.url, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["queue_size"] >= 1
    status, info, _ = request(server.url, "GET", "/model")
    assert status == 200
    saved = json.loads((model_dir / "config.json").read_text())
    assert info["model_id"] == health["model_id"]
    assert info["config"]["model"] == saved["model"] and info["config"]["calibration"]["score_min"] == pytest.approx(
        saved["calibration"]["score_min"]
    )
    assert info["image_size"] == 32 and info["threshold"] == 0.5
    assert "paths" not in info["config"]["calibration"] and "excluded_paths" not in info["config"]


def test_malformed_bodies_get_4xx_and_the_server_keeps_serving(server, images, reference):
    good = images[1].read_bytes()
    bodies = bench.malformed_bodies(images[0].read_bytes(), oversize_bytes=MAX_BODY + 1, bomb_side=2000)
    expected = {
        "empty": (400, "empty body"),
        "truncated PNG": (400, "truncated"),
        "0 MB payload": (413, "exceeds the limit"),
        "non-image": (415, "not an image"),
        "decompression bomb (2000x2000)": (413, "4000000 pixels is over the limit"),
        "multipart without 'image'": (400, "no field 'image'"),
    }
    assert set(bodies) == set(expected)
    for name, (body, content_type) in bodies.items():
        status, answer = predict(server.url, body, content_type=content_type)
        assert (status, expected[name][1] in answer["error"]) == (expected[name][0], True), (name, answer)
        status, answer = predict(server.url, good)
        assert status == 200
        assert_matches(answer, reference[1])
    # A chunked body without Content-Length is counted as it arrives.
    conn = bench._connection(server.url)
    conn.request("POST", "/predict", body=iter([b"\0" * MAX_BODY, b"\0" * 16]), encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()


@pytest.mark.parametrize(
    "method, path, query, status, words",
    [
        ("POST", "/predict", "?maps=heat", 400, "maps must be one of"),
        ("POST", "/predict", "?path=/etc/passwd", 400, "unknown query parameter 'path'"),
        ("GET", "/predict", "", 405, "Method Not Allowed"),
        ("GET", "/weights", "", 404, "Not Found"),
    ],
)
def test_bad_requests_name_the_problem(server, images, method, path, query, status, words):
    got, answer, _ = request(server.url, method, path + query, images[0].read_bytes() if method == "POST" else None)
    assert got == status and words in answer["error"]


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class _GatedModel:
    """Wraps Service.predict_arrays: the first call waits on ``release``; records every batch size."""

    def __init__(self, service: Service) -> None:
        self.inner = service.predict_arrays
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def __call__(self, arrays, sizes):
        self.batches.append(len(arrays))
        self.entered.set()
        assert self.release.wait(30)
        return self.inner(arrays, sizes)


def _in_thread(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    return thread, out


def test_a_full_queue_answers_503_at_once(model_dir, images, reference, monkeypatch):
    service = Service(model_dir, ServeOptions(queue_size=1, max_batch=1, batch_wait_ms=0, device="cpu"))
    gate = _GatedModel(service)
    monkeypatch.setattr(service, "predict_arrays", gate)
    data = images[0].read_bytes()
    with start_server(service) as running:
        try:
            first, first_out = _in_thread(predict, running.url, data)
            assert gate.entered.wait(30)  # the worker holds request 1
            second, second_out = _in_thread(predict, running.url, data)
            _wait_for(lambda: service.queue.qsize() == 1)  # request 2 fills the queue
            start = time.monotonic()
            status, answer, headers = request(running.url, "POST", "/predict", data)
            assert status == 503 and "queue" in answer["error"] and headers.get("Retry-After") == "1"
            assert time.monotonic() - start < 5
        finally:
            gate.release.set()
        first.join(30)
        second.join(30)
    for status, answer in first_out + second_out:
        assert status == 200
        assert_matches(answer, reference[0])


def test_concurrent_requests_share_one_forward_pass(model_dir, images, reference, monkeypatch):
    service = Service(model_dir, ServeOptions(queue_size=8, max_batch=8, batch_wait_ms=0, device="cpu"))
    gate = _GatedModel(service)
    monkeypatch.setattr(service, "predict_arrays", gate)
    with start_server(service) as running:
        try:
            first, first_out = _in_thread(predict, running.url, images[0].read_bytes())
            assert gate.entered.wait(30)
            waiting = [_in_thread(predict, running.url, path.read_bytes()) for path in images[1:]]
            _wait_for(lambda: service.queue.qsize() == len(images) - 1)
        finally:
            gate.release.set()
        for thread, _ in [(first, first_out), *waiting]:
            thread.join(30)
    assert gate.batches == [1, len(images) - 1]
    answers = [first_out[0]] + [out[0] for _, out in waiting]
    for (status, answer), expected in zip(answers, reference, strict=True):
        assert status == 200
        assert_matches(answer, expected)


@pytest.mark.slow
def test_load_benchmark_runs_and_writes_its_json(model_dir, tmp_path):
    out = tmp_path / "serve_load.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", str(model_dir)]
    command += ["--clients", "2", "--requests", "12", "--max-batch", "4", "--fault-rounds", "1", "--threads", "1"]
    command += ["--oversize-mb", "21", "--bomb-side", "12000", "--request-side", "64", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    (row,) = result["load"]
    assert row["n_200"] == 12 and row["n_5xx"] == 0 and row["wrong_scores"] == 0
    assert result["faults"]["good_correct"] == result["faults"]["good_requests"] == 6
    assert all(400 <= s < 500 for r in result["faults"]["bodies"].values() for s in r["statuses"])
    assert "| max batch |" in done.stdout and "| malformed body |" in done.stdout


def test_cli_serve_without_the_extra_names_the_pip_command(model_dir, monkeypatch, capsys):
    import importlib.util

    from cavga.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", str(model_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "uvicorn" in err and "pip install 'cavga[serve]'" in err


def test_cli_serve_refuses_a_bad_limit_with_a_message(model_dir, capsys):
    from cavga.cli import main

    assert main(["serve", str(model_dir), "--port", "0", "--queue-size", "0"]) == 2
    assert "queue_size must be an integer >= 1" in capsys.readouterr().err
