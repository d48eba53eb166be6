"""The multi-rank tests' launcher: ``run_ranks(fn, world_size, *args)`` forks gloo ranks (tests/forked.py)."""

from forked import run_ranks

__all__ = ["run_ranks"]
