"""Model accounting: parameters, activated parameters, KV cache and training FLOPs — pure functions of the config.

Counted as DeepSeek counts: ``total_params`` is the main model (embedding, blocks, final norm, output head);
``active_params`` are the parameters one token touches, including the output head but not the input embedding table;
MTP modules are reported apart (``mtp_params``, excluding the embedding and head they share with the main model).
Training FLOPs per token = 6 x active (non-embedding) parameters + causal attention (QKᵀ and AV at the mean causal
context of S/2 keys, x3 for forward + backward). These formulas are cross-checked in the tests against a model built
on the ``meta`` device.
"""

from __future__ import annotations

from hai.config import ModelConfig

__all__ = ["attention_params", "dense_mlp_params", "moe_params", "param_counts", "kv_cache_bytes_per_token",
           "attention_flops_per_token", "train_flops_per_token", "account"]


def attention_params(c: ModelConfig) -> int:
    H, N, R, V, C, D = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.hidden_size
    q = D * H * (N + R) if c.q_lora_rank is None else D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * (N + R)
    return q + D * (C + R) + C + C * H * (N + V) + H * V * D


def dense_mlp_params(c: ModelConfig) -> int:
    return 3 * c.hidden_size * c.intermediate_size


def moe_params(c: ModelConfig, active: bool = False) -> int:
    D, F = c.hidden_size, c.moe_intermediate_size
    routed = (c.n_activated_experts if active else c.n_routed_experts) * 3 * D * F
    return c.n_routed_experts * D + routed + c.n_shared_experts * 3 * D * F


def _block(c: ModelConfig, moe: bool, active: bool = False) -> int:
    ffn = moe_params(c, active) if moe else dense_mlp_params(c)
    return 2 * c.hidden_size + attention_params(c) + ffn


def _n_moe_layers(c: ModelConfig) -> int:
    return c.num_layers - c.first_k_dense_replace if c.is_moe else 0


def param_counts(c: ModelConfig) -> dict[str, int]:
    D, V = c.hidden_size, c.vocab_size
    n_moe = _n_moe_layers(c)
    n_dense = c.num_layers - n_moe
    embed = head = V * D
    blocks = n_dense * _block(c, False) + n_moe * _block(c, True)
    blocks_active = n_dense * _block(c, False) + n_moe * _block(c, True, active=True)
    mtp_one = 3 * D + 2 * D * D + _block(c, c.is_moe)
    mtp_one_active = 3 * D + 2 * D * D + _block(c, c.is_moe, active=True)
    return {
        "total_params": embed + blocks + D + head,
        "active_params": blocks_active + D + head,
        "embedding_params": embed,
        "mtp_params": c.mtp_depth * mtp_one,
        "mtp_active_params": c.mtp_depth * mtp_one_active,
        "routed_expert_params": n_moe * c.n_routed_experts * 3 * D * c.moe_intermediate_size,
    }


def kv_cache_bytes_per_token(c: ModelConfig, bytes_per_elem: int = 2) -> int:
    """MLA caches the compressed latent and the shared RoPE key per layer: (kv_lora_rank + qk_rope_head_dim)."""
    return c.num_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_elem


def attention_flops_per_token(c: ModelConfig, seq_len: int, layers: int | None = None) -> float:
    """Forward+backward FLOPs of the attention core (scores and weighted sum), causal: mean context seq_len/2."""
    layers = c.num_layers if layers is None else layers
    fwd = 2 * (seq_len / 2) * c.num_heads * (c.qk_head_dim + c.v_head_dim)
    return 3 * fwd * layers


def train_flops_per_token(c: ModelConfig, seq_len: int, include_mtp: bool = False) -> float:
    counts = param_counts(c)
    n = counts["active_params"]
    flops = 6 * n + attention_flops_per_token(c, seq_len)
    if include_mtp and c.mtp_depth:
        flops += 6 * (counts["mtp_active_params"] + c.mtp_depth * c.vocab_size * c.hidden_size)
        flops += attention_flops_per_token(c, seq_len, layers=c.mtp_depth)
    return flops


def account(c: ModelConfig, seq_len: int) -> dict:
    counts = param_counts(c)
    return {
        "model": c.name,
        **counts,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(c),
        "seq_len": seq_len,
        "train_flops_per_token": train_flops_per_token(c, seq_len),
        "train_flops_per_token_with_mtp": train_flops_per_token(c, seq_len, include_mtp=True),
    }
