"""Hugging Face DeepSeek checkpoints in and out (DeepSeek-V3 with its MTP layer, DeepSeek-V2, V2-Lite).

A checkpoint directory holds ``config.json``, one or more ``*.safetensors`` shards and (sharded) a
``model.safetensors.index.json`` weight map: the released layout, one tensor per routed expert
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``), the MTP module of depth d as decoder layer
``model.layers.{L + d - 1}`` with ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of the embedding
and output head (``embed_tokens``, ``shared_head.head``). Released FP8 weights (e4m3 with a fp32 ``weight_scale_inv``
per 128x128 block) are dequantized on load.

- :func:`model_config` derives HAI's :class:`~hai.config.ModelConfig` from ``config.json``, refusing (naming the
  field and value) what HAI does not implement. Imported models use the release's MTP conventions: the MTP module
  takes the main model's *normed* final state (``mtp_hidden=post_norm``) and projects ``[enorm(e); hnorm(h)]``
  (``mtp_concat=embed_first``).
- :func:`load_into` fills a model laid out for one rank (by the parallel layer's ``parallelize``) with the tensors
  that rank holds: it opens only the shards those live in and reads only its layers' and its experts' tensors
  (safetensors memory-maps; nothing else is read).
- :func:`save` writes a single-process model as a directory ``transformers`` loads
  (``AutoModelForCausalLM.from_pretrained``), the MTP layer in the released layout.

The name map between HAI and the release is :func:`hf_keys`; RoPE pairs are interleaved in both (the release's
``rope_interleave``), so no weight is permuted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterator

import torch
from torch import nn

from hai.config import ConfigError, ModelConfig

__all__ = ["HFError", "hf_dir", "read_config", "check_config", "model_config", "hf_keys", "load_into", "save",
           "apply_init_from", "FIELDS"]

INDEX = "model.safetensors.index.json"


class HFError(ValueError):
    """A Hugging Face checkpoint is missing, malformed or uses something HAI does not implement."""


def hf_dir(spec: str) -> str:
    """``hf:DIR`` -> DIR (checked)."""
    path = spec[3:] if spec.startswith("hf:") else spec
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HFError(f"model.init_from={spec!r}: {path!r} is not a Hugging Face checkpoint directory (no "
                      f"config.json): point it at a directory with config.json and *.safetensors")
    return path


def read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{file} is not a readable JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{file} holds a JSON {type(hf).__name__}, not a config object")
    return hf


# ------------------------------------------------------------------------------------------------ config mapping
def _refuse(field: str, value: Any, why: str) -> None:
    raise HFError(f"config.json {field}={value!r}: {why}")


_INT, _NUM, _BOOL, _STR, _DICT, _LIST = "an integer", "a number", "true/false", "a string", "an object", "a list"
# Every config.json field this module reads: (what it must be, required, may be null). Checked before any is used.
FIELDS: dict[str, tuple[str, bool, bool]] = {
    **{k: (_INT, True, False) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
        "moe_intermediate_size")},
    **{k: (_INT, False, False) for k in ("first_k_dense_replace", "max_position_embeddings", "moe_layer_freq",
                                         "num_nextn_predict_layers")},
    **{k: (_INT, False, True) for k in ("q_lora_rank", "n_shared_experts", "n_group", "topk_group",
                                        "num_key_value_heads")},
    **{k: (_NUM, False, False) for k in ("rms_norm_eps", "routed_scaling_factor", "rope_theta")},
    **{k: (_BOOL, False, False) for k in ("norm_topk_prob", "attention_bias", "mlp_bias", "tie_word_embeddings",
                                          "rope_interleave")},
    **{k: (_STR, False, False) for k in ("topk_method", "scoring_func", "hidden_act")},
    "_name_or_path": (_STR, False, True),
    **{k: (_DICT, False, True) for k in ("rope_scaling", "rope_parameters", "quantization_config")},
}
ROPE_FIELDS = {"rope_type": (_STR, False, True), "type": (_STR, False, True), "rope_theta": (_NUM, False, False),
               "factor": (_NUM, False, False), "original_max_position_embeddings": (_INT, False, False),
               **{k: (_NUM, False, True) for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")}}
YARN_REQUIRED = ("factor", "original_max_position_embeddings")
QUANT_FIELDS = {"quant_method": (_STR, False, True), "weight_block_size": (_LIST, False, True)}


def _is(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {_BOOL: bool, _STR: str, _DICT: dict, _LIST: list}[kind])


def _check_fields(hf: dict, fields: dict, where: str = "") -> None:
    """Each field of ``fields`` present where required, of its type (or null where allowed)."""
    for name, (kind, required, nullable) in fields.items():
        if name not in hf:
            if required:
                raise HFError(f"config.json has no {where}{name!r} ({kind}), which HAI reads to build the model: "
                              f"this checkpoint is not a complete DeepSeek-V2/V3 config")
            continue
        value = hf[name]
        if not (_is(value, kind) or (value is None and nullable)):
            raise HFError(f"config.json {where}{name}={value!r} must be {kind}{' or null' if nullable else ''}")


def check_config(hf: dict) -> str:
    """The checkpoint's model type after checking every field :func:`model_config` reads (presence and type), the
    model type first: a config of another architecture is refused by its ``model_type``."""
    kind = hf.get("model_type")
    if kind is None:
        raise HFError("config.json has no 'model_type': HAI imports deepseek_v3 and deepseek_v2 checkpoints")
    if kind not in ("deepseek_v3", "deepseek_v2"):
        _refuse("model_type", kind, "HAI imports deepseek_v3 and deepseek_v2 checkpoints (another architecture "
                                    "cannot be loaded into a DeepSeek model)")
    _check_fields(hf, FIELDS)
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key):
            _check_fields(hf[key], ROPE_FIELDS, f"{key}.")
    if hf.get("quantization_config"):
        _check_fields(hf["quantization_config"], QUANT_FIELDS, "quantization_config.")
    return kind


def _rope(hf: dict) -> dict:
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if kind in (None, "default"):
        return {"rope_theta": float(theta)}
    if kind != "yarn":
        _refuse("rope_scaling.type", kind, "HAI implements plain RoPE and YaRN only")
    for name in YARN_REQUIRED:
        if name not in rope:
            raise HFError(f"config.json rope_scaling (yarn) has no {name!r} ({ROPE_FIELDS[name][0]}), which YaRN needs")
    return {"rope_theta": float(theta), "rope_factor": float(rope["factor"]),
            "rope_original_max_seq_len": int(rope["original_max_position_embeddings"]),
            "rope_beta_fast": float(rope.get("beta_fast") or 32), "rope_beta_slow": float(rope.get("beta_slow") or 1),
            "rope_mscale": float(rope.get("mscale") or 1.0), "rope_mscale_all_dim": float(rope.get("mscale_all_dim")
                                                                                          or 0.0)}


def _check_supported(hf: dict) -> str:
    kind = check_config(hf)
    for field, ok, why in (
            ("hidden_act", hf.get("hidden_act", "silu") == "silu", "HAI's MLPs are SwiGLU (silu)"),
            ("attention_bias", not hf.get("attention_bias", False), "HAI's projections have no bias"),
            ("mlp_bias", not hf.get("mlp_bias", False), "HAI's MLPs have no bias"),
            ("tie_word_embeddings", not hf.get("tie_word_embeddings", False), "HAI keeps embedding and head apart"),
            ("rope_interleave", hf.get("rope_interleave", True), "HAI's RoPE rotates interleaved pairs"),
            ("moe_layer_freq", hf.get("moe_layer_freq", 1) == 1, "HAI puts an MoE in every layer after the dense "
                                                                   "ones"),
            ("num_key_value_heads", hf.get("num_key_value_heads") in (None, hf.get("num_attention_heads")),
             "MLA has one latent for all heads (num_key_value_heads must equal num_attention_heads)")):
        if not ok:
            _refuse(field, hf.get(field), why)
    quant = hf.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or list(quant.get("weight_block_size") or []) != [128, 128]):
        _refuse("quantization_config", quant, "HAI dequantizes FP8 e4m3 weights with 128x128 block scales only")
    return kind


def _routing(hf: dict, kind: str) -> dict:
    method = hf.get("topk_method", "noaux_tc" if kind == "deepseek_v3" else "greedy")
    score = hf.get("scoring_func", "sigmoid" if kind == "deepseek_v3" else "softmax")
    if score not in ("sigmoid", "softmax"):
        _refuse("scoring_func", score, "HAI's routers score with sigmoid (V3) or softmax (V2)")
    if method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        _refuse("topk_method", method, "HAI implements noaux_tc (V3), greedy and group_limited_greedy (V2)")
    n_group, topk_group = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    if method == "greedy":
        n_group = topk_group = 1
    return {"score_func": score, "norm_topk_prob": bool(hf.get("norm_topk_prob", kind == "deepseek_v3")),
            "route_scale": float(hf.get("routed_scaling_factor", 1.0)), "n_group": n_group, "topk_group": topk_group,
            "group_scoring": "sum_top2" if method == "noaux_tc" else "max"}


def model_config(hf: dict, base: ModelConfig | None = None, mtp_depth: int | None = None) -> ModelConfig:
    """HAI's model config for a checkpoint's ``config.json``: the architecture from the checkpoint, the training
    knobs (precision, balancing speed, aux-loss weight, MTP weight, init std) from ``base``."""
    kind = _check_supported(hf)
    if not hf.get("n_routed_experts"):
        _refuse("n_routed_experts", hf.get("n_routed_experts"), "HAI imports mixture-of-experts checkpoints")
    arch = dict(
        name=os.path.basename(str(hf.get("_name_or_path") or kind)) or kind, vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0), intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], max_seq_len=hf.get("max_position_embeddings", 4096),
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf["num_experts_per_tok"], moe_intermediate_size=hf["moe_intermediate_size"],
        mtp_depth=int(hf.get("num_nextn_predict_layers", 0)) if mtp_depth is None else mtp_depth,
        mtp_hidden="post_norm", mtp_concat="embed_first", init_from=None, **_rope(hf), **_routing(hf, kind))
    base = base or ModelConfig()
    try:
        return dataclasses.replace(base, **arch)
    except ConfigError as e:
        raise HFError(f"the checkpoint's config.json maps to an invalid HAI model config: {e}") from None


# -------------------------------------------------------------------------------------------------- name map
_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _block_key(prefix: str, rest: list[str]) -> str | None:
    """HAI's name inside a block (``attn.wq_a.weight``, ``ffn.experts.w1`` ...) -> the release's, for layer
    ``prefix``; experts are returned with ``{e}`` to fill."""
    head = rest[0]
    if head == "attn_norm":
        return f"{prefix}.input_layernorm.weight"
    if head == "ffn_norm":
        return f"{prefix}.post_attention_layernorm.weight"
    if head == "attn":
        return f"{prefix}.self_attn.{_ATTN[rest[1]]}.weight"
    if head != "ffn":
        return None
    if rest[1] in _MLP:  # dense MLP
        return f"{prefix}.mlp.{_MLP[rest[1]]}.weight"
    if rest[1] == "router":
        return f"{prefix}.mlp.gate.{'weight' if rest[2] == 'weight' else 'e_score_correction_bias'}"
    if rest[1] == "shared":
        return f"{prefix}.mlp.shared_experts.{_MLP[rest[2]]}.weight"
    if rest[1] == "experts":
        return f"{prefix}.mlp.experts.{{e}}.{_MLP[rest[2]]}.weight"
    return None


def hf_keys(cfg: ModelConfig, name: str) -> str:
    """The release's tensor name for HAI's parameter or persistent buffer ``name`` (``{e}`` for a routed expert)."""
    parts = name.split(".")
    key = None
    if name == "embed.weight":
        key = "model.embed_tokens.weight"
    elif name == "norm.weight":
        key = "model.norm.weight"
    elif name == "head.weight":
        key = "lm_head.weight"
    elif parts[0] == "layers":
        key = _block_key(f"model.layers.{parts[1]}", parts[2:])
    elif parts[0] == "mtp":
        layer = f"model.layers.{cfg.num_layers + int(parts[1])}"
        sub = {"enorm": "enorm.weight", "hnorm": "hnorm.weight", "proj": "eh_proj.weight",
               "norm": "shared_head.norm.weight"}
        key = f"{layer}.{sub[parts[2]]}" if parts[2] in sub else _block_key(layer, parts[3:])
    if key is None:
        raise HFError(f"no Hugging Face name for HAI tensor {name!r}")
    return key


# ------------------------------------------------------------------------------------------------------ reading
class _Shards:
    """Lazy access to a checkpoint's tensors: one safetensors handle per shard, opened on first use."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.where = json.load(f)["weight_map"]
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if not files:
                raise HFError(f"{path!r} has config.json but no *.safetensors shards")
            self.where = {}
            for n in files:
                for k in self._open(n).keys():
                    self.where[k] = n
        self._handles: dict[str, Any] = {}
        self.read_bytes, self.read_tensors = 0, 0

    def _open(self, file: str):
        from safetensors import safe_open

        if not hasattr(self, "_handles"):
            self._handles = {}
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(os.path.join(self.path, file), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - a damaged shard is reported by name
                raise HFError(f"{os.path.join(self.path, file)} is not a readable safetensors file ({e})") from None
        return self._handles[file]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise HFError(f"{self.path}: tensor {key!r} is missing from the checkpoint")
        t = self._open(self.where[key]).get_tensor(key)
        self.read_bytes += t.numel() * t.element_size()
        self.read_tensors += 1
        scale_key = key + "_scale_inv"
        if t.dtype == torch.float8_e4m3fn and scale_key in self.where:
            s = self._open(self.where[scale_key]).get_tensor(scale_key)
            self.read_bytes += s.numel() * s.element_size()
            t = _dequant_blocks(t, s)
        return t

    def mtp_depth(self, num_layers: int) -> int:
        d = 0
        while f"model.layers.{num_layers + d}.eh_proj.weight" in self.where:
            d += 1
        return d


def _dequant_blocks(q_NK: torch.Tensor, s_NbKb: torch.Tensor) -> torch.Tensor:
    """w = q * scale_inv per 128x128 block (the release's FP8 weights), in fp32."""
    N, K = q_NK.shape
    s = s_NbKb.float().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    return q_NK.float() * s


def _owned(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(full name, owning module, attribute, tensor) of every parameter and persistent buffer the model holds."""
    persistent = set(model.state_dict(keep_vars=True))
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in module.named_parameters(recurse=False):
            yield prefix + pname, module, pname, p
        for bname, b in module.named_buffers(recurse=False):
            if prefix + bname in persistent:
                yield prefix + bname, module, bname, b


@torch.no_grad()
def load_into(model: nn.Module, cfg: ModelConfig, path: str) -> dict:
    """Copy the checkpoint's tensors into ``model`` (materialized, laid out for this rank): only what it holds is
    read. Returns what was read (tensors, bytes, seconds)."""
    t0 = time.perf_counter()
    shards = _Shards(path)
    for name, module, attr, t in _owned(model):
        key = hf_keys(cfg, name)
        if "{e}" in key:  # stacked routed experts: this rank's rows only
            offset = module.expert_offset
            for e in range(t.shape[0]):
                t[e].copy_(_checked(shards.get(key.format(e=offset + e)), t[e].shape, key.format(e=offset + e)))
        elif key not in shards and attr == "bias":  # V2 routers have no balancing bias
            t.zero_()
        else:
            t.copy_(_checked(shards.get(key), t.shape, key))
    return {"tensors": shards.read_tensors, "bytes": shards.read_bytes, "seconds": time.perf_counter() - t0}


def _checked(src: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    if src.shape != shape:
        raise HFError(f"tensor {key!r} has shape {tuple(src.shape)} but the model config needs {tuple(shape)}: the "
                      f"checkpoint and its config.json disagree")
    return src


def apply_init_from(cfg):
    """A config whose ``model.init_from`` names a Hugging Face checkpoint gets that checkpoint's architecture
    (the training knobs stay the user's). Idempotent."""
    spec = cfg.model.init_from
    if not spec:
        return cfg
    path = hf_dir(spec)
    model = model_config(read_config(path), cfg.model)  # every field it reads checked before use
    model = dataclasses.replace(model, mtp_depth=_Shards(path).mtp_depth(model.num_layers), init_from=spec)
    return dataclasses.replace(cfg, model=model)


# ------------------------------------------------------------------------------------------------------ writing
def _hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    v3 = cfg.score_func == "sigmoid"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.rope_original_max_seq_len, "beta_fast": cfg.rope_beta_fast,
                "beta_slow": cfg.rope_beta_slow, "mscale": cfg.rope_mscale, "mscale_all_dim": cfg.rope_mscale_all_dim}
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "routed_scaling_factor": cfg.route_scale,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_group": cfg.n_group, "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
        "first_k_dense_replace": cfg.first_k_dense_replace, "moe_layer_freq": 1, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope, "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "rope_theta": cfg.rope_theta, "attention_bias": False, "tie_word_embeddings": False,
        "num_nextn_predict_layers": cfg.mtp_depth, "dtype": str(dtype).replace("torch.", ""),
        "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if cfg.n_group > 1 else "greedy"),
    }
    if v3:
        out["rope_interleave"] = True
    elif cfg.n_group > 1 and cfg.group_scoring != "max":
        raise HFError(f"model.group_scoring={cfg.group_scoring} has no DeepSeek-V2 equivalent (V2 scores groups by "
                      f"their max): set model.group_scoring=max")
    if v3 and cfg.n_group > 1 and cfg.group_scoring != "sum_top2":
        raise HFError(f"model.group_scoring={cfg.group_scoring} has no DeepSeek-V3 equivalent (V3 sums each group's "
                      f"top 2): set model.group_scoring=sum_top2")
    return out


def _check_mtp_exportable(cfg: ModelConfig) -> None:
    if cfg.mtp_depth and (cfg.mtp_hidden != "post_norm" or cfg.mtp_concat != "embed_first"):
        raise HFError(f"model.mtp_hidden={cfg.mtp_hidden} / mtp_concat={cfg.mtp_concat}: the release's MTP layer takes "
                      f"the normed final state and projects [enorm(e); hnorm(h)]; export a model trained with "
                      f"model.mtp_hidden=post_norm model.mtp_concat=embed_first, or with model.mtp_depth=0")


def _hf_state(model: nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(release name, tensor) of every weight, the MTP layers' embedding/head copies included."""
    _check_mtp_exportable(cfg)
    for name, _, _, t in _owned(model):
        key = hf_keys(cfg, name)
        if "{e}" in key:
            for e in range(t.shape[0]):
                yield key.format(e=e), t[e]
        else:
            yield key, t
    for d in range(cfg.mtp_depth):
        layer = f"model.layers.{cfg.num_layers + d}"
        yield f"{layer}.embed_tokens.weight", model.embed.weight
        yield f"{layer}.shared_head.head.weight", model.head.weight


def save(model: nn.Module, cfg: ModelConfig, out_dir: str, max_shard_bytes: int = 4 * 2**30) -> dict:
    """Write a single-process model as a Hugging Face checkpoint directory (safetensors shards + index +
    config.json). Returns {files, tensors, bytes}. A model whose conventions the release cannot express is refused
    before anything is written."""
    from safetensors.torch import save_file

    dtype = next(model.parameters()).dtype
    _check_mtp_exportable(cfg)
    config = _hf_config(cfg, dtype)
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in _hf_state(model, cfg):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().to("cpu").contiguous().clone()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return {"files": len(shards), "tensors": len(weight_map), "bytes": total}
