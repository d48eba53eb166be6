"""The DeepSeek-V3 model (single device, pure PyTorch, no collectives)."""

from hai.model.attention import MLA, KVCache
from hai.model.moe import Dispatcher, GroupedExperts, LocalDispatcher, MoE, Route, Router
from hai.model.init import materialize, param_dtype
from hai.model.transformer import Block, LossOutput, MTPModule, Transformer, build_model

__all__ = ["MLA", "KVCache", "Dispatcher", "GroupedExperts", "LocalDispatcher", "MoE", "Route", "Router", "Block",
           "LossOutput", "MTPModule", "Transformer", "build_model", "materialize", "param_dtype"]
