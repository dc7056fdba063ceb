"""Import a script of ``benchmarks/`` or ``benchmarks/studies/`` (not packages) by its file name, for the tests of
that script."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Product benchmarks first, then the studies that chose the defaults.
FOLDERS = (BENCHMARKS, BENCHMARKS / "studies")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` or ``benchmarks/studies/NAME.py`` as a fresh module."""
    paths = [folder / f"{name}.py" for folder in FOLDERS]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no benchmark script {name!r}: looked for {', '.join(map(str, paths))}")
    spec = importlib.util.spec_from_file_location(f"cavga_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
