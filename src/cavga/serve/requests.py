"""What ``cavga serve`` makes of a request body before the model sees it: the image (format and pixel caps), a
multipart field, and the base64 encodings of the answer's maps; the model's id and public config."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # what `cavga predict` reads from a folder


class RequestError(Exception):
    """A request the service refuses: ``status`` is the HTTP status, the message names the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# ---------------------------------------------------------------- bodies and images
def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image in ``data`` as cavga reads image files (8-bit "L" or "RGB"), or a RequestError."""
    from cavga.data.io import to_gray_or_rgb

    if not data:
        raise RequestError(400, "empty body: send the image file's bytes, or a multipart form with field 'image'")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap below replaces PIL's warning; PIL's hard limit (DecompressionBombError) stays.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise RequestError(
                        413,
                        f"image of {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                        "pixels (a decompression bomb, or start the server with a larger --max-pixels)",
                    )
                img.load()
                return to_gray_or_rgb(img)
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image refused as a possible decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise RequestError(
            415, f"body is not an image in a format this server reads ({', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError ... on broken data
        raise RequestError(400, f"image cannot be decoded (truncated or corrupt?): {exc}") from exc


def multipart_field(body: bytes, content_type: str, name: str = "image") -> bytes:
    """The bytes of field ``name`` of a multipart/form-data ``body`` (held in memory: the body is capped)."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data body without a boundary in its Content-Type")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header = [bytearray(), bytearray()]
    ended = [False]

    def on_header_end() -> None:
        parts[-1][0][bytes(header[0]).strip().lower()] = bytes(header[1]).strip()
        header[0].clear()
        header[1].clear()

    callbacks = {
        "on_part_begin": lambda: parts.append(({}, bytearray())),
        "on_header_field": lambda d, s, e: header[0].extend(d[s:e]),
        "on_header_value": lambda d, s, e: header[1].extend(d[s:e]),
        "on_header_end": on_header_end,
        "on_part_data": lambda d, s, e: parts[-1][1].extend(d[s:e]),
        "on_end": lambda: ended.__setitem__(0, True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise RequestError(400, f"malformed multipart/form-data body: {exc}") from exc
    if not ended[0]:
        raise RequestError(400, "multipart/form-data body is truncated (no closing boundary)")
    names = []
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        field_name = disposition.get(b"name", b"").decode("latin-1")
        if field_name == name:
            return bytes(data)
        names.append(field_name)
    raise RequestError(400, f"multipart/form-data body has no field {name!r} (its fields: {names})")


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def array_base64(array: np.ndarray) -> dict[str, Any]:
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": base64.b64encode(little.tobytes()).decode()}


def model_id(model_dir: str | os.PathLike) -> str:
    """A short content hash of config.json and model.safetensors: equal ids mean equal models."""
    from cavga.model_files import CONFIG_FILE, WEIGHTS_FILE

    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(Path(model_dir) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def public_config(config: dict) -> dict:
    """config.json without its lists of training-machine file paths (long, and nothing a client needs)."""
    config = json.loads(json.dumps(config))
    calibration = config.get("calibration", {})
    if "paths" in calibration:
        calibration["n_paths"] = len(calibration.pop("paths"))
    if "excluded_paths" in config:
        config["n_excluded_paths"] = len(config.pop("excluded_paths"))
    return config


def require_server_packages() -> None:
    """Name the missing packages of the optional ``serve`` extra instead of failing on an import."""
    import importlib.util

    from cavga.errors import ConfigError

    missing = [name for name in ("starlette", "uvicorn", "python_multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"cavga serve needs {', '.join(missing)}: pip install 'cavga[serve]'")


# ---------------------------------------------------------------- the model worker
