"""The parallel layer: topology and meshes, pipeline placement, ZeRO-1, expert-parallel dispatch."""
if __name__ != "hai.parallel":  # imported as a bare `parallel` from the checkout root: see hai/_shadow.py
    from hai._shadow import step_aside

    step_aside(__name__, __file__)  # the lines below then only import hai.parallel

from hai.parallel.layout import PipelineLayout, num_stages, param_copies, rank_stages, stage_layer_split, stage_layers
from hai.parallel.pending import Chain, Joint, Pending
from hai.parallel.topology import AXES, Topology
from hai.parallel.zero import StepResult, ZeroAdamW, is_expert_param

__all__ = ["AXES", "Topology", "PipelineLayout", "num_stages", "param_copies", "rank_stages", "stage_layer_split",
           "stage_layers", "Pending", "Chain", "Joint", "ZeroAdamW", "StepResult", "is_expert_param"]
from hai.parallel.expert import EPDispatcher, EPHandle, check_ep_config, expert_range, shard_experts

__all__ += ["EPDispatcher", "EPHandle", "check_ep_config", "expert_range", "shard_experts"]
