"""Model accounting against a model built on the meta device and against DeepSeek's published numbers."""

import json

import pytest
import torch

from hai.plan.accounting import account, param_counts
from hai.cli import main
from hai.config.compose import compose
from hai.model import build_model


def _meta_counts(cfg):
    model = build_model(cfg, device="meta")
    main_p = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp_p = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    # active: every parameter except the embedding table and the routed experts a token does not use
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and not n.startswith("mtp."))
    n_moe = sum(1 for layer in model.layers if type(layer.ffn).__name__ == "MoE")
    active = main_p - model.embed.weight.numel() - experts
    if n_moe:
        active += experts * cfg.n_activated_experts // cfg.n_routed_experts
    return main_p, mtp_p, active


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek_v3_671b", "deepseek_v2_lite"])
def test_formulas_match_meta_model(name):
    cfg = compose([f"model={name}"]).model
    counts = param_counts(cfg)
    main_p, mtp_p, active = _meta_counts(cfg)
    assert counts["total_params"] == main_p
    assert counts["mtp_params"] == mtp_p
    assert counts["active_params"] == active


def test_deepseek_v3_published_numbers():
    """arXiv:2412.19437: 671B total, 37B activated, 70.272 KB KV cache per token, 250 GFLOPs/token at 4K."""
    a = account(compose(["model=deepseek_v3_671b"]).model, seq_len=4096)
    assert a["total_params"] / 1e9 == pytest.approx(671, rel=0.005)
    assert a["active_params"] / 1e9 == pytest.approx(37, rel=0.02)
    assert a["kv_cache_bytes_per_token"] == 70272
    assert a["train_flops_per_token"] / 1e9 == pytest.approx(250, rel=0.02)


def test_deepseek_v2_lite_published_numbers():
    """arXiv:2405.04434: DeepSeek-V2-Lite has 15.7B total and 2.4B activated parameters."""
    a = account(compose(["model=deepseek_v2_lite"]).model, seq_len=4096)
    assert a["total_params"] / 1e9 == pytest.approx(15.7, rel=0.01)
    assert a["active_params"] / 1e9 == pytest.approx(2.4, rel=0.05)


def test_account_cli_prints_json(capsys):
    assert main(["account", "model=deepseek_v3_671b", "train.seq_len=4096", "output=json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_cache_bytes_per_token"] == 70272 and report["total_params"] > 6.7e11


def test_meta_model_allocates_nothing():
    model = build_model(compose(["model=deepseek_v3_671b"]).model, device="meta")
    assert all(p.device == torch.device("meta") for p in model.parameters())
