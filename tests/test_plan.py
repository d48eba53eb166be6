"""`hai plan`: memory arithmetic against a meta-device model, the V3 production plan, bad layouts, JSON output and
the pipeline section / pictures of a pp=8 DualPipe plan."""

import dataclasses
import json
from dataclasses import asdict
import time

import pytest
import torch

from hai.cli import main
from hai.config import compose
from hai.model.transformer import build_model
from hai.parallel.zero import is_expert_param
from hai.parallel import Topology
from hai.parallel.parallelize import parallelize
from hai.pipeline.simulate import Costs, report
from hai.plan import plan
from hai.plan.memory import rank_params

V3 = ["model=deepseek_v3_671b", "cluster=h800_2048", "parallel=v3_2048", "train=v3_pretrain"]
PP8 = ["experiment=dualpipe_pp8"]  # model=small on one 8-GPU node, DualPipe pp=8, 20 micro-batches


def _meta_rank_params(cfg, pp_rank):
    """(dense, expert) parameter elements of a pipeline rank, counted on the real construction path on meta."""
    topo = Topology.from_config(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, node_limit=0)))
    model = build_model(cfg.model, device="meta")
    parallelize(model, topo, cfg, rank=topo.rank_of(pp_rank, 0, 0))
    dense = expert = 0
    for name, prm in model.named_parameters():
        if is_expert_param(name):
            expert += prm.numel()
        else:
            dense += prm.numel()
    return dense, expert


@pytest.mark.parametrize("overrides", [
    ["model=small", "cluster.nodes=4", "parallel.pp=4", "parallel.dp=2", "parallel.ep=2", "parallel.schedule=dualpipe",
     "train.global_batch_size=16", "train.micro_batch_size=1"],
    ["model=small", "cluster.nodes=4", "parallel.pp=4", "parallel.dp=2", "parallel.ep=2", "parallel.schedule=1f1b",
     "train.global_batch_size=16", "train.micro_batch_size=1"],
    ["model=small", "cluster.nodes=4", "parallel.pp=2", "parallel.dp=4", "parallel.ep=4", "parallel.schedule=dualpipev",
     "train.global_batch_size=16", "train.micro_batch_size=1"],
])
def test_rank_params_match_meta_model(overrides):
    cfg = compose(overrides)
    for rank in range(cfg.parallel.pp):
        got = rank_params(cfg, rank)
        assert (got.dense, got.expert) == _meta_rank_params(cfg, rank), rank


def test_v3_rank_params_match_meta_model():
    cfg = compose(V3)
    for rank in (0, 7):  # rank 0 holds stages 0 and 15 (embedding, head, MTP); rank 7 two middle stages
        got = rank_params(cfg, rank)
        assert (got.dense, got.expert) == _meta_rank_params(cfg, rank), rank


def _v3_rank0_by_hand():
    D, V = 7168, 129280
    attn = D * 1536 + 1536 + 1536 * 128 * 192 + D * 576 + 512 + 512 * 128 * 256 + 128 * 128 * D
    dense_layer = 2 * D + attn + 3 * D * 18432
    moe_shared = 2 * D + attn + 256 * D + 3 * D * 2048  # router + shared expert
    experts = 4 * 3 * D * 2048  # 256 experts / ep=64 per MoE layer
    # stage 0: layers 0-2 (dense); stage 15: layers 58-60 (MoE) + final norm + head + MTP (MoE block, 3 norms, proj);
    # one embedding
    dense = 3 * dense_layer + 3 * moe_shared + D + V * D + (moe_shared + 3 * D + 2 * D * D) + V * D
    return dense, 4 * experts


def test_v3_plan(tmp_path):
    cfg = compose(V3)
    t0 = time.perf_counter()
    r = plan(cfg, out_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 10
    mem = r["memory"]
    dense, expert = _v3_rank0_by_hand()
    assert mem["worst_param_rank"] == 0 and mem["param_copies"] == 2
    assert mem["params_per_gpu"] == {"dense": dense, "expert": expert, "total": dense + expert}
    assert mem["bytes"]["parameters"] == 2 * (dense + expert)  # bf16 weights
    assert mem["bytes"]["gradients"] == 4 * (dense + expert)  # fp32 gradients
    assert mem["bytes"]["optimizer"] == pytest.approx(8 * (dense / 128 + expert / 2))  # fp32 master + bf16 moments
    assert 5.0e9 < dense + expert < 5.6e9
    assert isinstance(mem["fits"], bool) and mem["capacity"] == 80e9 and mem["policy"] == "v3"
    a = mem["activations"]
    assert 0 < a["v3"]["peak"] < a["bf16_recompute"]["peak"] < a["bf16"]["peak"]
    assert mem["without_gate_grad_rows"]["total"] < mem["total"] == a["v3"]["total"]
    from hai.plan.memory import static_bytes, rank_params

    for x in [*a.values(), mem["without_gate_grad_rows"]]:  # every total is one rank's static bytes + its own peak
        static = sum(static_bytes(cfg, rank_params(cfg, x["rank"])).values())
        assert x["static"] == pytest.approx(static) and x["total"] == pytest.approx(static + x["activations"])
    assert r["topology"] == {"built": True, "backend": "fake", "world_size": 2048,
                             "mesh": {"pp": 16, "edp": 2, "ep": 64}}
    assert r["pipeline"]["peak_activations"] == 17  # DualPipe: PP + 1
    tok = r["communication"]["ep_per_token_per_layer"]
    assert tok["dispatch_row_bytes"] == 7168 + 7168 // 128 * 4 and tok["ib"] == pytest.approx(4 * 7 / 8)
    th = r["throughput"]
    assert 100 < th["tokens_per_s_per_gpu"] < 20000 and 0.01 < th["mfu_bf16"] < 1
    assert th["flops_per_token"] == pytest.approx(250e9, rel=0.01)
    names = [row["variant"] for row in r["comparisons"]]
    assert names[1:] == ["schedule=1f1b", "node_limit=unlimited", "GEMMs in bf16"]
    assert r["published_check"]["ratio_plan_over_published"]["tokens_per_s_per_gpu"] > 0


@pytest.mark.parametrize("bad, message", [
    (["parallel.ep=48"], "parallel.ep=48 does not divide parallel.dp=128"),
    (["parallel.dp=64"], "world size 2048"),
    (["parallel.node_limit=9"], "parallel.node_limit=9 exceeds the 8 node(s)"),
])
def test_bad_layouts_fail_with_named_messages(bad, message, capsys):
    assert main(["plan", *V3, *bad]) == 2
    err = capsys.readouterr().err
    assert "hai plan: error:" in err and message in err


def test_pp8_dualpipe_json_pipeline_section_and_pictures(tmp_path, capsys):
    assert main(["plan", *PP8, "output=json", f"out_dir={tmp_path}"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("layout", "topology", "pipeline", "memory", "step", "throughput", "communication", "comparisons",
                "published_check", "assumptions", "files"):
        assert key in r, key
    sec = r["pipeline"]
    costs = Costs(**sec["costs"])  # the JSON round-trips, per-stage costs included
    assert len(costs.stages) == 8 and costs == Costs(**json.loads(json.dumps(asdict(costs))))
    ref = report("dualpipe", 8, 20, costs)
    for key in ("step_time", "bubble", "bubble_formula", "peak_activations", "peak_activations_per_rank", "stages",
                "param_copies", "bubble_per_rank", "busy_per_rank"):
        assert sec[key] == pytest.approx(ref[key]), key
    assert sec["peak_activations"] == 9  # PP + 1
    png = tmp_path / "schedule.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])


def test_text_report_and_local_plan(tmp_path, capsys):
    assert main(["plan", f"out_dir={tmp_path}"]) == 0  # this machine's default layout: pp=1, no pipeline
    out = capsys.readouterr().out
    for title in ("== layout", "== memory per GPU", "== communication", "== step time", "== comparisons",
                  "== assumptions"):
        assert title in out
    assert not torch.distributed.is_initialized()


def _measured_rank(rank, world, out_dir):
    from hai.data import TokenFile, ensure_token_file
    from hai.parallel import Topology
    from hai.trainer import Trainer, init_distributed

    cfg = compose(["model=tiny", "train=test", "wandb.mode=disabled", f"out_dir={out_dir}"])  # default local layout
    topo = Topology.from_config(cfg)
    trainer = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    trainer.train_step()
    model = trainer.model
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # activations: storages autograd keeps for the backward of one micro-batch (parameters excluded), then gradients
    tokens = trainer.sampler.micro_batches(1, trainer.coords["dp"], topo.dp, cfg.train.micro_batch_size)[0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            kept[st.data_ptr()] = st.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens)
    out.loss.backward()
    grad_bytes = sum(p.main_grad.numel() * p.main_grad.element_size() for p in model.parameters())
    return params, trainer.optimizer.state_bytes(), param_bytes, grad_bytes, sum(kept.values())


@pytest.mark.multiproc
def test_local_plan_memory_matches_a_real_local_run(tmp_path):
    """Issue 8 item 4: the plan of this machine's default layout (4 ranks, ep=4, ZeRO-1) against what a real run holds."""
    from dist_utils import run_ranks

    r = plan(compose(["model=tiny", "train=test", f"out_dir={tmp_path}"]))
    mem = r["memory"]
    measured = run_ranks(_measured_rank, 4, str(tmp_path))
    assert mem["policy"] == "bf16"  # an fp32 model: HAI's eager path, no recompute, fp32 storage
    act_plan = mem["activations"]["bf16"]["peak"]
    ratios = []
    for params, opt_bytes, param_bytes, grad_bytes, act_bytes in measured:
        assert params == mem["params_per_gpu"]["total"]
        assert param_bytes == mem["bytes"]["parameters"]
        assert grad_bytes == mem["bytes"]["gradients"]
        assert opt_bytes == pytest.approx(mem["bytes"]["optimizer"], rel=0.01)  # ZeRO-1 padding aside
        ratios.append(act_bytes / act_plan)
    # The plan counts what a fused implementation must keep; HAI's eager CPU path keeps more (the attention
    # probabilities of the math SDPA path, SiLU outputs, per-expert slices, int routing tensors): measured
    # 1.33-1.83x, the spread across ranks being routing imbalance (the plan assumes balanced routing). A formula
    # that overestimates, or an implementation that bloats past 2.5x, fails here.
    assert all(1.0 <= r <= 2.5 for r in ratios), ratios


def test_v3_activation_bytes_per_token_by_hand():
    """Each storage policy's bytes per token of a V3 MoE layer, written out from the paper's dimensions."""
    from hai.plan.memory import layer_act_parts

    m = compose(V3).model
    D, H, N, R, V, C, Q, E, k, F = 7168, 128, 128, 64, 128, 512, 1536, 256, 8, 2048
    fp8 = 1 + 4 / 128
    want = {
        "bf16": {"attention": 2 * (2 * D + 2 * Q + (C + R) + C + 2 * H * (N + R) + H * V + H * V) + 4 * H,
                 "ffn": 2 * (2 * D + 3 * F) + 4 * E, "routed_rows": 2 * k * (2 * D + 3 * F)},
        "bf16_recompute": {"attention": 2 * (D + Q + C + R + H * V) + 4 * H,
                           "ffn": 2 * (D + 3 * F) + 4 * E, "routed_rows": 2 * k * (2 * D + 3 * F)},
        "v3": {"attention": 2 * (D + Q + C + R) + 1.5 * H * V + 4 * H,
               "ffn": 2 * D + 4 * E + fp8 * 2 * F, "routed_rows": k * (fp8 * D + fp8 * 2 * F + 2 * D)},
    }
    for policy, parts in want.items():
        assert layer_act_parts(m, True, policy) == pytest.approx(parts), policy


def test_memory_policy_is_the_models_or_the_callers():
    from hai.plan.memory import memory_report

    cfg = compose(PP8)  # a bf16 model: HAI's eager storage unless asked otherwise
    own, v3 = memory_report(cfg, 20), memory_report(cfg, 20, "v3")
    assert (own["policy"], v3["policy"]) == ("bf16", "v3")
    assert own["total"] == own["activations"]["bf16"]["total"] and v3["total"] == v3["activations"]["v3"]["total"]
    assert v3["total"] < own["total"]
