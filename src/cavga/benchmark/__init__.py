"""The paper's experiments as benchmark suites (``cavga benchmark SUITE``)."""

from cavga.benchmark.runner import *  # noqa: F403
