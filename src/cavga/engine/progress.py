"""Progress bars of the passes over images that fit() makes after training (the memory fill, the calibration).

The functions doing those passes call :func:`advance` once per batch; it moves the bar that the caller opened
with :func:`progress_bar` around them, and does nothing where none is open. So a bar needs no argument threaded
through every function between fit() and the loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_BAR: ContextVar[Any] = ContextVar("cavga_progress_bar", default=None)


@contextmanager
def progress_bar(desc: str, enabled: bool = True, total: int | None = None) -> Iterator[Any]:
    """A tqdm bar counting images (``enabled=False``: none) that :func:`advance` moves while the block runs."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    token = _BAR.set(bar)
    try:
        yield bar
    finally:
        _BAR.reset(token)
        bar.close()


def advance(n_images: int) -> None:
    """Count ``n_images`` more on the open bar, if any."""
    bar = _BAR.get()
    if bar is not None:
        bar.update(n_images)
