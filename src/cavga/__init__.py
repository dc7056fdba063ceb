"""cavga: image anomaly detection and localization with CAVGA (ECCV 2020)."""

from __future__ import annotations

__version__ = "0.1.0"
