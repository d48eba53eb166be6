"""The DeepSeek-V3 model against independent references: routing rule, balancing, MLA cache, MTP targets."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hai.config import ModelConfig
from hai.config.compose import compose
from hai.model import KVCache, LocalDispatcher, build_model
from hai.model.moe import MoE, Router



def route_reference(x_TD, weight_ED, bias_E, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight per-token loop of the routing rule, for tests: returns (topk_idx sorted, weights in that order)."""
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    per_group = E // cfg.n_group
    idx_out, w_out = [], []
    for x in x_TD.double():
        logits = weight_ED.double() @ x
        s = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(-1)
        b = s + bias_E.double()
        top = {"max": 1, "sum_top2": 2}.get(cfg.group_scoring, k // cfg.topk_group)
        groups = sorted(range(cfg.n_group), key=lambda g: -sum(sorted(b[g * per_group:(g + 1) * per_group].tolist(),
                                                                     reverse=True)[:top]))
        allowed = [e for g in groups[:cfg.topk_group] for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(sorted(allowed, key=lambda e: -b[e].item())[:k])
        w = s[chosen]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        idx_out.append(chosen)
        w_out.append((w * cfg.route_scale).tolist())
    return torch.tensor(idx_out), torch.tensor(w_out, dtype=torch.float64)

def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(compose(["model=tiny"]).model, **kw)


def _random_moe(cfg: ModelConfig, std: float) -> MoE:
    """An MoE layer with seeded N(0, std) weights, so the routing is far from uniform."""
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=std)
    return moe


@pytest.mark.parametrize("kw", [
    dict(n_routed_experts=16, n_activated_experts=4, n_group=4, topk_group=2, route_scale=2.5),
    dict(n_routed_experts=16, n_activated_experts=4, n_group=1, topk_group=1),
    dict(n_routed_experts=8, n_activated_experts=2, score_func="softmax", norm_topk_prob=False, n_group=1,
         topk_group=1),
])
def test_router_matches_per_token_reference(kw):
    cfg = tiny(**kw)
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.bias.normal_(std=0.1)  # the bias must steer selection but not the gates
    x = torch.randn(64, cfg.hidden_size)
    route = router(x)
    ref_idx, ref_w = route_reference(x, router.weight, router.bias, cfg)
    idx_sorted, order = route.topk_idx.sort(dim=-1)
    assert torch.equal(idx_sorted, ref_idx)
    torch.testing.assert_close(route.topk_weight.gather(1, order).double(), ref_w, rtol=1e-5, atol=1e-6)
    if cfg.norm_topk_prob:
        torch.testing.assert_close(route.topk_weight.sum(-1), torch.full((64,), cfg.route_scale))


def test_group_limit_keeps_experts_within_topk_group_groups():
    cfg = tiny(n_routed_experts=32, n_activated_experts=8, n_group=8, topk_group=4)
    for seed in range(20):
        torch.manual_seed(seed)
        router = Router(cfg)
        torch.nn.init.normal_(router.weight, std=1.0)
        idx = router(torch.randn(128, cfg.hidden_size)).topk_idx
        groups_per_token = [(len(set((row // 4).tolist()))) for row in idx]
        assert max(groups_per_token) <= 4


def test_bias_update_moves_load_toward_balance():
    """Aux-loss-free balancing alone (no gradient) must shrink the max load violation on a skewed router."""
    cfg = tiny(n_routed_experts=8, n_activated_experts=2, n_group=1, topk_group=1)
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.3)
    router.weight.data[0] += 1.0  # a strongly preferred expert
    x = torch.randn(512, cfg.hidden_size) + 0.5

    def violation():
        router.load.zero_()
        router(x)
        load = router.load.clone()
        return (load.max() / load.mean() - 1).item(), load

    v0, load = violation()
    for _ in range(300):
        router.update_bias(load, gamma=0.01)
        _, load = violation()
    v1, _ = violation()
    assert v0 > 1.0 and v1 < 0.5 * v0, (v0, v1)
    # the bias only steers selection: the gates still come from unbiased affinities
    assert router.bias[0] < router.bias[1:].min()


def test_seq_aux_loss_matches_formula():
    cfg = tiny(seq_aux_alpha=0.01)
    moe = _random_moe(cfg, std=0.3)
    B, S = 3, 10
    x = torch.randn(B * S, cfg.hidden_size)
    route = moe.router(x)
    got = moe.seq_aux_loss(route, B)
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    ref = 0.0
    for b in range(B):
        s = route.scores[b * S:(b + 1) * S].double()
        idx = route.topk_idx[b * S:(b + 1) * S]
        f = torch.tensor([(idx == i).sum().item() * E / (K * S) for i in range(E)], dtype=torch.float64)
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        ref += cfg.seq_aux_alpha * (f * P).sum().item() / B
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_aux_loss_gradient_reaches_router():
    """The injected balance loss must produce router gradients even when the main loss ignores the MoE output."""
    cfg = tiny(seq_aux_alpha=1.0)
    moe = _random_moe(cfg, std=0.1)
    x = torch.randn(2, 8, cfg.hidden_size)
    (moe(x) * 0).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_local_dispatcher_equals_dense_loop():
    cfg = tiny()
    moe = _random_moe(cfg, std=0.2)
    x = torch.randn(20, cfg.hidden_size)
    route = moe.router(x)
    recv, counts, h = LocalDispatcher(cfg.n_routed_experts).dispatch(x, route.topk_idx, route.topk_weight)
    y = LocalDispatcher(cfg.n_routed_experts).combine(moe.experts(recv, counts), h)
    ref = torch.zeros_like(x)
    for t in range(20):
        for k in range(cfg.n_activated_experts):
            e = route.topk_idx[t, k]
            w1, w3, w2 = moe.experts.w1[e], moe.experts.w3[e], moe.experts.w2[e]
            ref[t] += route.topk_weight[t, k] * (F.silu(x[t] @ w1.T) * (x[t] @ w3.T)) @ w2.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # fp32, different summation order


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_mla_cached_decode_equals_full_forward(q_lora_rank):
    cfg = tiny(q_lora_rank=q_lora_rank)
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model.forward_logits(tokens)
    cache = KVCache()
    parts = [model.forward_logits(tokens[:, :5], cache)]
    for i in range(5, 12):
        parts.append(model.forward_logits(tokens[:, i:i + 1], cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    # the cache holds only the latent and the shared RoPE key: (kv_lora_rank + qk_rope_head_dim) per layer
    assert cache.c_kv[0].shape == (2, 12, cfg.kv_lora_rank) and cache.k_pe[0].shape == (2, 12, cfg.qk_rope_head_dim)
    assert cache.bytes_per_token(2) == cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2


def test_attention_is_causal():
    cfg = tiny()
    model = build_model(cfg, seed=0).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model.forward_logits(a)[:, :7], model.forward_logits(b)[:, :7])


def test_mtp_loss_uses_shifted_targets():
    """Recompute the MTP loss by hand: depth k at position i sees token i+k and predicts token i+k+1."""
    cfg = tiny(mtp_depth=2, seq_aux_alpha=0.0)
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))  # S = 8
    out = model(tokens)
    S = 8
    h = model.embed(tokens[:, :S])
    for layer in model.layers:
        h = layer(h)
    main = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), tokens[:, 1:].flatten())
    losses = []
    for k, mod in enumerate(model.mtp, start=1):
        hk = torch.cat([mod.hnorm(h[:, :S - k]), mod.enorm(model.embed(tokens[:, k:S]))], -1)
        h = mod.block(mod.proj(hk))
        logits = model.head(mod.norm(h))
        losses.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, k + 1:].flatten()))
    torch.testing.assert_close(out.main_loss, main)
    torch.testing.assert_close(out.mtp_loss, torch.stack(losses).mean())
    torch.testing.assert_close(out.loss, main + cfg.mtp_lambda * torch.stack(losses).mean())
    # a wrong shift (predicting token i+k instead of i+k+1) would give a different number
    wrong = F.cross_entropy(logits.flatten(0, 1), tokens[:, 2:S].flatten())
    assert not torch.allclose(wrong, losses[-1])


def test_mtp_shares_embedding_and_head():
    model = build_model(tiny(), seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("mtp.") and ("embed" in n or "head" in n) for n in names)


def test_first_k_dense_then_moe():
    cfg = tiny(num_layers=4, first_k_dense_replace=2)
    model = build_model(cfg, seed=0)
    kinds = [type(layer.ffn).__name__ for layer in model.layers]
    assert kinds == ["SwiGLU", "SwiGLU", "MoE", "MoE"]
