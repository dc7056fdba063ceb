"""``cavga serve``: a saved model behind HTTP, for the program on an inspection line that asks about each image.

    POST /predict   an image (PNG, JPEG, BMP or TIFF) as the raw body or as the multipart field ``image``;
                    ``?maps=png`` adds the anomaly map and mask as base64 PNGs, ``?maps=raw`` as base64
                    little-endian arrays (float32 map, uint8 mask) that equal ``Cavga.predict`` exactly
    GET  /health    {"status": "ok", ...} while the model worker runs, else 503
    GET  /model     the model's config.json (without the per-file path lists) and its id

The stack is Starlette on uvicorn (ASGI), with python-multipart for form bodies. Why: all three are maintained,
widely deployed and small; uvicorn parses HTTP (h11), keeps connections alive, caps concurrent connections
(``limit_concurrency``, answered 503) and shuts down gracefully, which the standard library's ``http.server``
leaves to its user and its documentation says not to rely on in production. FastAPI would add validation
layers that four routes do not need.

Robustness, from the request inwards:
- The body is read with a size cap (``max_body_bytes``, 413), before any decoding; no file name, path or
  pickle is ever taken from a request.
- Only the formats ``cavga predict`` reads are opened (PIL's ``formats=``, so no Ghostscript or other
  plug-in decoders); the pixel count is checked from the header before decoding (``max_pixels``, 413), which
  refuses decompression bombs without allocating them.
- Decoding and resizing run in a few threads (``decode_threads``); the model runs only in one worker thread.
  Between them sits a bounded queue of preprocessed images (model-sized, so small): when it is full the request
  is answered 503 with Retry-After at once, instead of memory growing with the backlog.
- The worker takes one image, then whatever else is queued within ``batch_wait_ms``, up to ``max_batch``, and
  scores them in one forward pass (the model is in eval mode, so batching changes no result).

Run it with ``cavga serve MODEL_DIR`` (``--host 127.0.0.1 --port 8000``
by default; ``--port 0`` takes a free port and prints it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cavga.serve.requests import (  # noqa: F401  (the request helpers are part of this module's API)
    ALLOWED_FORMATS,
    RequestError,
    array_base64,
    decode_image,
    model_id,
    multipart_field,
    png_base64,
    public_config,
    require_server_packages,
)

log = logging.getLogger(__name__)

MAPS_CHOICES = ("png", "raw")


@dataclass
class ServeOptions:
    """Limits and batching of the service; the defaults suit one line PC."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000  # 5000 x 5000; a decoded RGB image of this size is 75 MB
    queue_size: int = 32
    max_batch: int = 8
    batch_wait_ms: float = 2.0
    decode_threads: int = 2
    max_connections: int = 64  # uvicorn answers 503 beyond this many open connections and tasks
    threads: int | None = None  # torch intra-op threads (None: leave torch's setting as it is)
    device: str = "auto"

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "queue_size", "max_batch", "decode_threads", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")


@dataclass
class _Job:
    array: np.ndarray  # (C, H, W) float32: the preprocessed image
    original_size: tuple[int, int]
    future: Future = field(default_factory=Future)


_STOP = object()


class Service:
    """The loaded model, its worker thread and the bounded queue in front of it."""

    def __init__(self, model_dir: str | os.PathLike, options: ServeOptions | None = None) -> None:
        import torch

        from cavga.api import CONFIG_FILE, load

        require_server_packages()
        self.options = options or ServeOptions()
        self.options.validate()
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        self.model_dir = Path(model_dir)
        self.detector = load(self.model_dir, device=self.options.device)
        self.model_id = model_id(self.model_dir)
        self.config = json.loads((self.model_dir / CONFIG_FILE).read_text())
        self.queue: queue.Queue = queue.Queue(maxsize=self.options.queue_size)
        self.batch_sizes: list[int] = []  # of the last few hundred batches, for /health
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="cavga-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the worker thread."""
        if self._thread is not None and self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # requests
    def prepare(self, data: bytes) -> _Job:
        """Decode and preprocess one image (runs in a decode thread, not in the model's)."""
        image = decode_image(data, self.options.max_pixels)
        return _Job(self.detector.preprocess(image), image.size)

    def submit(self, job: _Job) -> Future:
        if not self.alive:
            raise RequestError(503, "the model worker is not running")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise RequestError(
                503,
                f"server busy: all {self.options.queue_size} places in the queue are taken; retry shortly",
                {"Retry-After": "1"},
            ) from None
        return job.future

    def predict_arrays(self, arrays: list[np.ndarray], original_sizes: list[tuple[int, int]]) -> list:
        """``Cavga.predict`` on already preprocessed images: one forward pass for the batch."""
        import torch

        from cavga.engine.infer import infer_batch
        from cavga.prediction import predictions_from

        detector = self.detector
        batch = torch.from_numpy(np.stack(arrays)).to(detector.device)
        # The same core and the same post-processing as Cavga.predict (the setting is model.config's).
        outputs = infer_batch(detector.model_, batch, detector.calibration_, reconstruct=False)
        return predictions_from(outputs, original_sizes)

    def _next_batch(self) -> tuple[list[_Job], bool]:
        first = self.queue.get()
        if first is _STOP:
            return [], True
        jobs = [first]
        deadline = time.monotonic() + self.options.batch_wait_ms / 1000.0
        while len(jobs) < self.options.max_batch:
            remaining = deadline - time.monotonic()
            try:
                # Whatever is queued already joins the batch; then wait for more only until the deadline.
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _work(self) -> None:
        stopping = False
        while not stopping:
            jobs, stopping = self._next_batch()
            if not jobs:
                continue
            self.batch_sizes = [*self.batch_sizes[-255:], len(jobs)]
            try:
                results = self.predict_arrays([j.array for j in jobs], [j.original_size for j in jobs])
            except Exception as exc:  # one failed forward pass must not end the service
                log.exception("inference failed for a batch of %d images", len(jobs))
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results, strict=True):
                job.future.set_result(result)

    # answers
    def answer(self, prediction, maps: str | None) -> dict[str, Any]:
        from cavga.metrics import THRESHOLD

        body: dict[str, Any] = {
            "pred_score": prediction.pred_score,
            "pred_label": prediction.pred_label,
            "raw_score": prediction.raw_score,
            "threshold": THRESHOLD,
            "model_id": self.model_id,
            "image_size": list(prediction.original_size),
            "anomalous_pixel_fraction": float(prediction.pred_mask.mean()),
        }
        if maps == "png":
            body["anomaly_map_png"] = png_base64(np.round(prediction.anomaly_map * 255).astype(np.uint8))
            body["pred_mask_png"] = png_base64(prediction.pred_mask.astype(np.uint8) * 255)
        elif maps == "raw":
            body["anomaly_map"] = array_base64(prediction.anomaly_map.astype(np.float32))
            body["pred_mask"] = array_base64(prediction.pred_mask.astype(np.uint8))
        return body

    def health(self) -> dict[str, Any]:
        recent = self.batch_sizes[-64:]
        return {
            "status": "ok" if self.alive else "worker stopped",
            "model_id": self.model_id,
            "queue_depth": self.queue.qsize(),
            "queue_size": self.options.queue_size,
            "mean_batch": round(sum(recent) / len(recent), 2) if recent else None,
        }

    def model_info(self) -> dict[str, Any]:
        from cavga.metrics import THRESHOLD

        model = self.config.get("model", {})
        return {
            "model_id": self.model_id,
            "name": self.model_dir.resolve().name,
            "threshold": THRESHOLD,
            "image_size": model.get("image_size"),
            "channels": model.get("channels"),
            "config": public_config(self.config),
        }


# ---------------------------------------------------------------- HTTP
async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = f"body exceeds the limit of {limit} bytes (start the server with a larger --max-body-mb)"
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > limit:
            raise RequestError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: Service):
    """The Starlette application over ``service`` (the worker starts and stops with the app's lifespan)."""
    import contextlib

    import anyio.to_thread
    from anyio import CapacityLimiter
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    limiter = CapacityLimiter(service.options.decode_threads)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    async def predict(request) -> JSONResponse:
        try:
            unknown = sorted(set(request.query_params) - {"maps"})
            if unknown:
                raise RequestError(400, f"unknown query parameter {unknown[0]!r} (known: maps)")
            maps = request.query_params.get("maps")
            if maps in ("1", "true"):
                maps = "png"
            elif maps in ("0", "false", ""):
                maps = None
            if maps is not None and maps not in MAPS_CHOICES:
                raise RequestError(400, f"maps must be one of png, raw, 1, 0; got {maps!r}")
            body = await read_body(request, service.options.max_body_bytes)
            content_type = request.headers.get("content-type", "")
            if content_type.lower().startswith("multipart/form-data"):
                body = multipart_field(body, content_type, "image")
            job = await anyio.to_thread.run_sync(service.prepare, body, limiter=limiter)
            prediction = await asyncio.wrap_future(service.submit(job))
            answer = await anyio.to_thread.run_sync(service.answer, prediction, maps, limiter=limiter)
        except RequestError as exc:
            return error(exc.status, exc.message, exc.headers)
        except ClientDisconnect:  # gone before its body arrived: nothing to answer, nothing to log as a failure
            return error(400, "client disconnected before the body was complete")
        except Exception as exc:
            log.exception("POST /predict failed")
            return error(500, f"inference failed: {type(exc).__name__}: {exc}")
        return JSONResponse(answer)

    async def health(request) -> JSONResponse:
        body = service.health()
        return JSONResponse(body, status_code=200 if service.alive else 503)

    async def model(request) -> JSONResponse:
        return JSONResponse(service.model_info())

    async def http_error(request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.stop)

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/model", model, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )


class RunningServer:
    """A uvicorn server on its own thread (for tests and for embedding); ``stop()`` shuts it down."""

    def __init__(self, server, thread: threading.Thread, url: str) -> None:
        self.server, self.thread, self.url = server, thread, url

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # from here on, clients wait in the backlog until uvicorn accepts them: none is refused
    return sock


def _uvicorn_server(service: Service, log_level: str):
    import uvicorn

    config = uvicorn.Config(
        create_app(service),
        log_level=log_level,
        access_log=log_level in ("debug", "info"),
        limit_concurrency=service.options.max_connections,
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_server(
    service: Service, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", timeout: float = 30.0
) -> RunningServer:
    """Serve ``service`` on a background thread; returns once it accepts connections (port 0: a free port)."""
    server = _uvicorn_server(service, log_level)
    sock = _bind(host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cavga-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return RunningServer(server, thread, _url(host, sock))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve a saved model until interrupted (Ctrl-C or SIGTERM)."""
    log_level = options.pop("log_level", "warning")
    service = Service(model_dir, ServeOptions(**options))
    if not is_loopback(host):
        log.warning("serving on %s: reachable from the network, with no authentication", host)
    sock = _bind(host, port)
    server = _uvicorn_server(service, log_level)
    print(f"cavga: serving {model_dir} ({service.model_id}) on {_url(host, sock)}", flush=True)
    server.run(sockets=[sock])
