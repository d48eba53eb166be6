"""Hugging Face checkpoints in and out, against ``transformers`` as the independent reference.

Tiny random models built and saved by transformers (tests/hf_models.py): DeepSeek-V3 with and without q-LoRA, with
YaRN, with the release's MTP layer; a DeepSeek-V2-style model (softmax gates, groups scored by their max, no q
compression). Imported into HAI they give transformers' logits in fp32 (relative <= 1e-5), also under a pp=2 x ep=2
layout whose ranks read only their own tensors; exported back, ``from_pretrained`` gives HAI's logits; an FP8 copy
(128x128 ``weight_scale_inv``) dequantizes within e4m3's rounding; training from an import starts at transformers'
loss on the same batch.
"""

import dataclasses
import json

import pytest
import torch

import hf_models
from dist_utils import run_ranks
from hai.model import hf
from hai.config.compose import compose
from hai.model import build_model, materialize

transformers = pytest.importorskip("transformers")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _hai(path, **kw):
    cfg = dataclasses.replace(hf.model_config(hf.read_config(path), **kw), precision="fp32")
    model = build_model(cfg, device="meta")
    materialize(model, "cpu", torch.float32, 0, 0.02)
    stats = hf.load_into(model, cfg, path)
    return model.eval(), cfg, stats


def _tokens(seed=0, B=2, S=40):
    return torch.randint(0, 320, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["v3", "v3_no_q_lora", "v3_yarn", "v2_group_max_softmax"])
def test_imported_logits_equal_transformers(variant, tmp_path):
    ref = {"v3": lambda: hf_models.v3(), "v3_no_q_lora": lambda: hf_models.v3(q_lora_rank=None),
           "v3_yarn": lambda: hf_models.v3(yarn=True), "v2_group_max_softmax": hf_models.v2}[variant]()
    ref.save_pretrained(tmp_path)
    model, cfg, _ = _hai(str(tmp_path), mtp_depth=0)
    tok = _tokens()
    with torch.no_grad():
        want = ref(tok).logits
    assert _rel(model.forward_logits(tok), want) <= 1e-5
    if variant == "v3_yarn":  # YaRN really changes the logits: the same weights without it do not match
        assert cfg.rope_factor == 4.0 and cfg.rope_mscale_all_dim == 1.0
        plain = dataclasses.replace(cfg, rope_factor=1.0, rope_mscale_all_dim=0.0)
        model.cfg = plain
        for m in model.modules():
            if hasattr(m, "softmax_scale"):
                m.cfg = plain
                m.softmax_scale = plain.qk_head_dim ** -0.5
        assert _rel(model.forward_logits(tok), want) > 1e-3
    if variant.startswith("v2"):
        assert (cfg.score_func, cfg.group_scoring, cfg.norm_topk_prob, cfg.q_lora_rank) == ("softmax", "max", False,
                                                                                             None)


def test_mtp_layer_in_the_release_layout(tmp_path):
    """The MTP depth-1 drafts equal the release's definition computed with transformers' own modules:
    shared_head.norm(block(eh_proj([enorm(emb(t_{i+1})); hnorm(final_norm(h_i))]))) through lm_head."""
    ref = hf_models.v3()
    ref.save_pretrained(tmp_path)
    block, parts = hf_models.add_mtp_layer(ref, str(tmp_path))
    model, cfg, _ = _hai(str(tmp_path), mtp_depth=1)
    assert (cfg.mtp_depth, cfg.mtp_hidden, cfg.mtp_concat) == (1, "post_norm", "embed_first")
    tok = _tokens(S=24)
    main, drafts = model.forward_logits_mtp(tok)
    with torch.no_grad():
        h = ref.model(tok).last_hidden_state  # after the final norm
        rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
        e = ref.model.embed_tokens(tok[:, 1:])
        x = torch.cat([rms(e, parts["enorm.weight"]), rms(h[:, :-1], parts["hnorm.weight"])], -1)
        x = x @ parts["eh_proj.weight"].T
        S = x.shape[1]
        pos = torch.arange(S)[None]
        mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
        y = block(x, attention_mask=mask, position_embeddings=ref.model.rotary_emb(x, pos))
        want = ref.lm_head(rms(y, parts["shared_head.norm.weight"]))
        assert _rel(main, ref(tok).logits) <= 1e-5
    assert _rel(drafts[0], want) <= 1e-5


def _export(tmp_path, model, cfg):
    out = tmp_path / "export"
    hf.save(model, cfg, str(out))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    return out, back


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    ref = hf_models.v3()
    ref.save_pretrained(tmp_path / "src")
    hf_models.add_mtp_layer(ref, str(tmp_path / "src"))
    model, cfg, _ = _hai(str(tmp_path / "src"), mtp_depth=1)
    out, back = _export(tmp_path, model, cfg)
    tok = _tokens(seed=3)
    with torch.no_grad():
        assert _rel(back(tok).logits, model.forward_logits(tok)) <= 1e-5
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    L = cfg.num_layers  # the MTP layer in the release's layout, with its embedding / head copies
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "embed_tokens.weight",
                "shared_head.head.weight", "mlp.experts.7.down_proj.weight", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{L}.{key}" in index, key
    again, _, _ = _hai(str(out), mtp_depth=1)  # and HAI reads its own export back, MTP included
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_hai_model_exports_for_transformers(tmp_path):
    """A model HAI initialized itself (release conventions chosen) exports with equal logits; one with HAI's
    default MTP conventions is refused, naming the fix."""
    cfg = dataclasses.replace(compose(["model=tiny"]).model, mtp_hidden="post_norm", mtp_concat="embed_first",
                              group_scoring="sum_top2")
    model = build_model(cfg, seed=0).eval()
    _, back = _export(tmp_path, model, cfg)
    tok = _tokens(seed=4)
    with torch.no_grad():
        assert _rel(back(tok).logits, model.forward_logits(tok)) <= 1e-5
    with pytest.raises(hf.HFError, match="model.mtp_hidden=pre_norm.*export a model trained with"):
        hf.save(build_model(compose(["model=tiny"]).model), compose(["model=tiny"]).model, str(tmp_path / "x"))
    bad = dataclasses.replace(cfg, group_scoring="max")  # refused by the config conversion: nothing written either
    with pytest.raises(hf.HFError, match="group_scoring=max has no DeepSeek-V3 equivalent"):
        hf.save(model, bad, str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # no half-written export


def test_fp8_checkpoint_dequantizes_within_e4m3_rounding(tmp_path):
    ref = hf_models.v3()
    ref.save_pretrained(tmp_path / "bf")
    hf_models.quantize_fp8(str(tmp_path / "bf"), str(tmp_path / "fp8"))
    exact, _, _ = _hai(str(tmp_path / "bf"), mtp_depth=0)
    deq, _, stats = _hai(str(tmp_path / "fp8"), mtp_depth=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
    checked = 0
    for (name, a), (_, b) in zip(exact.named_parameters(), deq.named_parameters()):
        if a.dim() < 2 or name in ("embed.weight", "head.weight") or ".router." in name:
            assert torch.equal(a, b), name  # not quantized
            continue
        # e4m3: 3 mantissa bits, so a normal value is off by at most 2^-4 of itself; a block's smallest normal is
        # its scale (amax / 448) times 2^-6, below which the spacing is scale * 2^-9
        scale = a.abs().amax() / 448.0
        assert ((a - b).abs() <= a.abs() * 2 ** -4 + scale * 2 ** -9).all(), name
        assert not torch.equal(a, b), name  # really quantized
        checked += 1
    assert checked >= 10 and stats["tensors"] > 0
    tok = _tokens(seed=5)
    # FP8 weights perturb the logits, and in this random tiny model flip some top-k routing choices: measured 0.26;
    # a missing or wrong scale is off by orders of magnitude
    assert _rel(deq.forward_logits(tok), exact.forward_logits(tok)) < 0.5


def _loss_rank(rank, world, overrides, tokens):
    from hai.data import TokenFile, ensure_token_file
    from hai.parallel import Topology
    from hai.train.trainer import Trainer, init_distributed

    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    tr = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    tr.sampler.micro_batches = lambda step, dp_rank, dp, mb: list(tokens[dp_rank * mb * tr.n_micro:]
                                                                   [:mb * tr.n_micro].split(mb))
    rec = tr.train_step()
    return rec["loss"], tr.imported["tensors"]


@pytest.mark.multiproc
@pytest.mark.parametrize("layout, world", [("single", 1), ("pp2_1f1b_dp2_ep2", 4)])
def test_training_from_an_import_starts_at_transformers_loss(layout, world, tmp_path):
    """`hai train model.init_from=hf:DIR`: the first step's loss equals transformers' loss on the same global batch
    (fp32); under pp=2 (1F1B) x dp=2 x ep=2 every rank reads only its stage's tensors and its experts."""
    ref = hf_models.v3()
    ref.save_pretrained(tmp_path / "src")
    hf_models.add_mtp_layer(ref, str(tmp_path / "src"))
    tokens = _tokens(seed=7, B=8, S=33)
    with torch.no_grad():  # next-token cross-entropy of the main model over the global batch
        logits = ref(tokens[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    ov = [f"model.init_from=hf:{tmp_path / 'src'}", "model.precision=fp32", "train=test", "train.seq_len=32",
          "train.global_batch_size=8", "wandb.mode=disabled", f"out_dir={tmp_path / 'run'}"]
    if layout == "single":
        ov += ["cluster=cpu1", "parallel=single", "train.micro_batch_size=2"]
    else:
        ov += ["cluster=local_cpu", "parallel=local", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2",
               "parallel.node_limit=0", "parallel.dispatch=flat", "parallel.schedule=1f1b", "train.micro_batch_size=1"]
    results = run_ranks(_loss_rank, world, ov, tokens)
    n_full = _hai(str(tmp_path / "src"), mtp_depth=1)[2]["tensors"]
    for loss, read in results:
        assert loss == pytest.approx(want.item(), rel=1e-5)
        assert read == n_full if world == 1 else read < n_full  # each rank of a layout reads its share only


def _hf_reads() -> set[str]:
    """The config.json fields hai/model/hf.py reads: every ``hf.get("x")`` / ``hf["x"]`` in its source."""
    import ast
    import inspect

    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(hf))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "hf" and node.args and \
                isinstance(node.args[0], ast.Constant):
            names.add(node.args[0].value)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "hf" and \
                isinstance(node.slice, ast.Constant):
            names.add(node.slice.value)
    return names


def test_every_config_field_hai_reads_is_checked_first():
    reads = _hf_reads()
    assert {"kv_lora_rank", "num_hidden_layers", "rope_scaling", "quantization_config"} <= reads  # the scan works
    assert reads - {"model_type"} <= set(hf.FIELDS), reads - set(hf.FIELDS)


@pytest.mark.parametrize("case, message", [
    ("llama", "config.json model_type='llama': HAI imports deepseek_v3 and deepseek_v2 checkpoints"),
    ("mixtral", "config.json model_type='mixtral'"),
    ("no_model_type", "config.json has no 'model_type'"),
    ("no_kv_lora_rank", "config.json has no 'kv_lora_rank' (an integer), which HAI reads"),
    ("no_num_hidden_layers", "config.json has no 'num_hidden_layers' (an integer)"),
    ("string_hidden_size", "config.json hidden_size='64' must be an integer"),
    ("yarn_without_original", "rope_scaling (yarn) has no 'original_max_position_embeddings'"),
    ("yarn_string_factor", "config.json rope_scaling.factor='x' must be a number"),
    ("not_json", "config.json is not a readable JSON config (JSONDecodeError"),
])
def test_init_from_another_architecture_is_one_error_line(case, message, tmp_path, capsys):
    """`hai train model.init_from=hf:DIR` on a config.json HAI cannot use: one `hai train: error:` line naming the
    model type or the field, exit code 2, no traceback."""
    base = json.loads(json.dumps(hf_models.v3().config.to_dict()))
    cfgs = {"llama": lambda: transformers.LlamaConfig().to_dict(), "mixtral": lambda: transformers.MixtralConfig()
            .to_dict(), "no_model_type": lambda: {k: v for k, v in base.items() if k != "model_type"},
            "no_kv_lora_rank": lambda: {k: v for k, v in base.items() if k != "kv_lora_rank"},
            "no_num_hidden_layers": lambda: {k: v for k, v in base.items() if k != "num_hidden_layers"},
            "string_hidden_size": lambda: {**base, "hidden_size": "64"},
            "yarn_without_original": lambda: {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "yarn_string_factor": lambda: {**base, "rope_scaling": {"rope_type": "yarn", "factor": "x"}},
            "not_json": lambda: "{oops"}
    cfg = cfgs[case]()
    (tmp_path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    from hai.cli import main

    assert main(["train", f"model.init_from=hf:{tmp_path}", "wandb.mode=disabled", f"out_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hai train: error: ") and message in err[0], err
