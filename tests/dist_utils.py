"""The multi-rank tests' launcher: ``run_ranks(fn, world_size, *args)`` forks gloo ranks (hai.parallel.forked)."""

from hai.parallel.forked import run_ranks

__all__ = ["run_ranks"]
