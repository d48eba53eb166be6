"""Tiny random DeepSeek models built and saved by ``transformers`` (the independent reference of tests/test_hf.py),
with the release's MTP layer written beside them and an FP8-quantized copy of a checkpoint."""

from __future__ import annotations

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
              qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=2,
              first_k_dense_replace=1, max_position_embeddings=128)


def _randomize(model, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn(m.e_score_correction_bias.shape, generator=g) * 0.05)
            if hasattr(m, "variance_epsilon"):  # RMSNorm weights near 1, as trained ones are
                m.weight.add_(1.0)
    return model.eval()


def v3(q_lora_rank=32, yarn=False, seed=0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**COMMON, q_lora_rank=q_lora_rank, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                           rope_scaling=YARN if yarn else None)
    cfg._attn_implementation = "eager"
    return _randomize(DeepseekV3ForCausalLM(cfg), seed=seed)


def v2(seed=0):
    """DeepSeek-V2-style: softmax gates, no top-k normalization, groups scored by their max, no q compression."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(**COMMON, q_lora_rank=None, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                           routed_scaling_factor=1.5, norm_topk_prob=False)
    cfg._attn_implementation = "eager"
    return _randomize(DeepseekV2ForCausalLM(cfg), seed=seed)


def _rewrite(path: str, extra: dict[str, torch.Tensor]) -> None:
    """Add tensors to a single-file checkpoint (and its index, if any)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = {**load_file(file), **extra}
    save_file(tensors, file, metadata={"format": "pt"})


def add_mtp_layer(model, path: str, seed=1) -> dict[str, torch.Tensor]:
    """Write a random MTP layer (depth 1) in the release's layout as decoder layer L: enorm, hnorm, eh_proj,
    shared_head.norm, a full MoE block, and copies of the embedding and head. Returns the block's state (release
    names without the layer prefix) for the reference forward."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    cfg = model.config
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    block = DeepseekV3DecoderLayer(cfg, layer_idx=max(L, cfg.first_k_dense_replace))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        block.input_layernorm.weight.add_(1.0)
        block.post_attention_layernorm.weight.add_(1.0)
    extra = {f"model.layers.{L}.{k}": v for k, v in _release_state(block).items()}
    parts = {"enorm.weight": 1 + 0.1 * torch.randn(D, generator=g), "hnorm.weight": 1 + 0.1 * torch.randn(D, generator=g),
             "eh_proj.weight": 0.1 * torch.randn(D, 2 * D, generator=g),
             "shared_head.norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
             "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
             "shared_head.head.weight": model.lm_head.weight.detach().clone()}
    extra.update({f"model.layers.{L}.{k}": v for k, v in parts.items()})
    _rewrite(path, extra)
    return block, parts


def _release_state(block) -> dict[str, torch.Tensor]:
    """A transformers decoder layer's state in the release's names (routed experts one tensor each)."""
    out = {}
    for k, v in block.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            F = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"mlp.experts.{e}.gate_proj.weight"] = v[e, :F].clone()
                out[f"mlp.experts.{e}.up_proj.weight"] = v[e, F:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"mlp.experts.{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v.detach().clone()
    return out


def quantize_fp8(src: str, dst: str) -> None:
    """An FP8 copy of a checkpoint as DeepSeek released V3: every 2-D projection weight e4m3 with a fp32
    ``weight_scale_inv`` per 128x128 block (norms, embedding, head and router gates stay as they were)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for k, t in tensors.items():
        quantize = t.dim() == 2 and "proj" in k and "embed" not in k and "head" not in k
        if not quantize:
            out[k] = t
            continue
        N, K = t.shape
        blocks = torch.nn.functional.pad(t.float(), (0, -K % 128, 0, -N % 128)).view(-(-N // 128), 128, -1, 128)
        scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
        q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[k] = q.view(blocks.shape[0] * 128, -1)[:N, :K].contiguous()
        out[k + "_scale_inv"] = scale
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
