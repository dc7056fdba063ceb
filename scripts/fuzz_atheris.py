"""Coverage-guided fuzzing of cavga's file readers with atheris (``pip install atheris``).

    python scripts/fuzz_atheris.py -max_total_time=300 [CORPUS_DIR]

Each input picks a reader (image, mask, IDX, CIFAR-10 binary, CIFAR-10 python batch) and hands it the rest of the
bytes as a file. A reader may return a result or raise DataError; any other exception is a finding, and atheris
stops and writes the input to ``crash-*``. Without a corpus folder, a seed corpus of small valid files is made.
"""

from __future__ import annotations

import io
import pickle
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

# PIL is instrumented too: most of the parsing that random bytes reach happens in its plugins.
with atheris.instrument_imports(include=["cavga", "PIL"]):
    from PIL import Image

    Image.init()  # imports every format plugin now, inside the instrumented block
    from cavga.data import io as cavga_io
    from cavga.data import oneclass
    from cavga.data.transforms import Preprocess
    from cavga.errors import DataError

WORK = Path(tempfile.mkdtemp(prefix="cavga-fuzz-"))
READERS = ("image", "mask", "idx", "cifar_bin", "cifar_py")
SUFFIX = {"image": ".png", "mask": ".png", "idx": "", "cifar_bin": ".bin", "cifar_py": ""}


def read(kind: str, path: Path) -> None:
    if kind == "image":
        Preprocess(16, 3)(cavga_io.load_image(path))
    elif kind == "mask":
        Preprocess(16).mask(cavga_io.load_mask(path))
    elif kind == "idx":
        oneclass.read_idx_file(path)
    elif kind == "cifar_bin":
        oneclass._cifar_binary(path)
    else:
        oneclass._cifar_python(path)


def one_input(data: bytes) -> None:
    if not data:
        return
    kind = READERS[data[0] % len(READERS)]  # the first byte picks the reader, the rest is the file
    path = WORK / f"input{SUFFIX[kind]}"
    path.write_bytes(data[1:])
    try:
        read(kind, path)
    except DataError:
        pass


def seed_corpus(folder: Path) -> None:
    """Small valid files of every kind, prefixed with the byte that selects their reader."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    seeds = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "RGB"), ("BMP", "L"), ("TIFF", "RGBA")):
        buffer = io.BytesIO()
        image = Image.fromarray(pixels)
        image = image.convert("I").convert("I;16") if mode == "I;16" else image.convert(mode)
        image.save(buffer, fmt)
        seeds += [(0, buffer.getvalue()), (1, buffer.getvalue())]
    idx = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in (2, 3, 3)) + bytes(range(18))
    seeds.append((2, idx))
    seeds.append((3, bytes(2 * oneclass.CIFAR_RECORD)))
    batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
    seeds.append((4, pickle.dumps(batch, protocol=2)))
    for i, (reader, payload) in enumerate(seeds):
        (folder / f"seed{i}").write_bytes(bytes([reader]) + payload)


def main() -> None:
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = WORK / "corpus"
        seed_corpus(corpus)
        args.append(str(corpus))
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
