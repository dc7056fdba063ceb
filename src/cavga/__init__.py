"""cavga: image anomaly detection and localization with CAVGA (ECCV 2020)."""

from __future__ import annotations

from typing import Any

from cavga._version import __version__

__all__ = ["Cavga", "Prediction", "load", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import cavga.metrics` or `cavga --help` should not pay for importing torch and the models.
    if name in ("Cavga", "Prediction", "load"):
        from cavga import api

        return getattr(api, name)
    raise AttributeError(f"module 'cavga' has no attribute {name!r}")
