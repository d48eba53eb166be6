"""Pipeline parallelism: schedules as data (1F1B, ZB1P, DualPipe, DualPipeV), validator, simulator, traces.

``build_schedule(name, pp, n_micro)`` gives every rank's compute actions; ``add_send_recv`` adds the P2P;
``validate`` checks a schedule (``hai.pipeline.engine``); ``simulate`` times it; ``report`` is what ``hai plan``
prints; ``hai.pipeline.trace`` writes Chrome traces and Gantt PNGs of a timeline. The runtime:
``hai.pipeline.executor.PipelineExecutor`` runs any schedule on real stages with batched P2P, and
``hai.pipeline.overlap`` overlaps an FB pair's expert all-to-alls with the other chunk's compute.
"""
if __name__ != "hai.pipeline":  # imported as a bare `pipeline` from the checkout root: see hai/_shadow.py
    from hai._shadow import step_aside

    step_aside(__name__, __file__)  # the lines below then only import hai.pipeline

from hai.pipeline.schedules import (
    SCHEDULE_NAMES,
    Action,
    Kind,
    ScheduleError,
    build_schedule,
    compute_only,
    format_grid,
    num_stages,
    param_copies,
    parse_text,
    rank_stages,
    schedule_1f1b,
    schedule_dualpipe,
    schedule_dualpipev,
    schedule_zb1p,
    to_text,
)
from hai.pipeline.simulate import (
    Costs,
    SimResult,
    add_send_recv,
    bubble_formula,
    format_report,
    peak_activations,
    report,
    simulate,
    simulate_schedule,
    validate,
)
from hai.pipeline.trace import Event, save_chrome_trace, save_gantt_png, to_chrome_trace

__all__ = [
    "SCHEDULE_NAMES",
    "Action",
    "Kind",
    "ScheduleError",
    "build_schedule",
    "compute_only",
    "format_grid",
    "num_stages",
    "param_copies",
    "parse_text",
    "rank_stages",
    "schedule_1f1b",
    "schedule_zb1p",
    "schedule_dualpipe",
    "schedule_dualpipev",
    "to_text",
    "Costs",
    "SimResult",
    "add_send_recv",
    "bubble_formula",
    "format_report",
    "peak_activations",
    "report",
    "simulate",
    "simulate_schedule",
    "validate",
    "Event",
    "save_chrome_trace",
    "save_gantt_png",
    "to_chrome_trace",
]
