"""The parallel layer: topology and meshes, ZeRO-1, expert-parallel dispatch."""

from hai.parallel.topology import AXES, Topology, stage_layer_split
from hai.parallel.zero import StepResult, ZeroAdamW, is_expert_param

__all__ = ["AXES", "Topology", "stage_layer_split", "ZeroAdamW", "StepResult", "is_expert_param"]
from hai.parallel.expert import EPDispatcher, EPHandle, Pending, check_ep_config, expert_range, shard_experts

__all__ += ["EPDispatcher", "EPHandle", "Pending", "check_ep_config", "expert_range", "shard_experts"]
