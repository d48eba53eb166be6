"""Planning and accounting: what a layout costs before it runs.

- :mod:`hai.plan.accounting`: parameters, activated parameters, KV cache and training FLOPs of a model config;
- :mod:`hai.plan.memory`: per-GPU weights, gradients, ZeRO-1 shard and activations of a layout;
- :mod:`hai.plan.cost`: per-chunk compute and communication, priced by
- :mod:`hai.plan.calibration`: the kernel / link throughput table (default: the published H800 one);
- :mod:`hai.plan.report`: ``hai plan`` (the pipeline simulator over those costs, the published-run check);
- :mod:`hai.plan.format`: its text rendering.
"""

from hai.plan.format import format_plan
from hai.plan.report import ASSUMPTIONS, PUBLISHED, build_fake_topology, plan, save_gantt

__all__ = ["plan", "format_plan", "PUBLISHED", "ASSUMPTIONS", "build_fake_topology", "save_gantt"]
