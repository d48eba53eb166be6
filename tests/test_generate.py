"""`hai generate` and `hai convert`: sampling with the latent KV cache, speculative decoding with MTP drafts (which
must reproduce greedy plain decoding token for token), from an imported Hugging Face model and from a HAI
checkpoint of a multi-rank run (resharded into one process), and the export of that checkpoint for transformers."""

import json

import pytest
import torch

import hf_models
from dist_utils import run_ranks
from hai.cli import main
from hai.config.compose import compose
from hai.checkpoint.load import load_model
from hai.inference.generate import generate, sample


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_generation_equals_argmax_of_full_forwards(speculative, tmp_path):
    """Independent reference: re-run the whole sequence each step and take the argmax of the last logits."""
    ref = hf_models.v3()
    ref.save_pretrained(tmp_path)
    hf_models.add_mtp_layer(ref, str(tmp_path))
    model, _ = load_model(compose([f"model.init_from=hf:{tmp_path}"]))
    prompt = [5, 17, 200, 3]
    out = generate(model, prompt, 12, speculative=speculative)
    seq = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            seq.append(int(model.forward_logits(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tokens == seq[len(prompt):]
    if speculative:
        assert out.drafts > 0 and 0 <= out.acceptance <= 1 and out.main_passes < 12


def test_sampling_respects_top_p():
    logits = torch.tensor([3.0, 2.9, -5.0, -6.0])
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.5, gen) for _ in range(200)}
    assert draws == {0, 1} or draws <= {0, 1}  # the two tokens holding > 50% of the mass; never the tail
    assert sample(logits, 0.0, 1.0, gen) == 0


def _train_rank(rank, world, overrides):
    from hai.data import TokenFile, ensure_token_file
    from hai.parallel import Topology
    from hai.train.trainer import Trainer, init_distributed

    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data))).fit()


@pytest.mark.multiproc
def test_generate_and_export_from_a_multi_rank_checkpoint(tmp_path, capsys):
    """A dp=2 x ep=2 run's checkpoint (routed experts sharded over two ranks) generates in one process, speculative
    decoding equals plain greedy decoding, and the export loads in transformers with the same logits."""
    out = tmp_path / "run"
    ov = ["model=tiny", "train=test", "train.steps=6", "train.save_every=6", "cluster=cpu1",
          "cluster.gpus_per_node=2", "parallel=single", "parallel.dp=2", "parallel.ep=2", "wandb.mode=disabled",
          "train.progress=false", "model.mtp_hidden=post_norm", "model.mtp_concat=embed_first",
          "model.group_scoring=sum_top2", f"out_dir={out}"]
    run_ranks(_train_rank, 2, ov)
    assert main(["generate", "resume=auto", f"out_dir={out}", "generate.speculative=true", "generate.max_new_tokens=24",
                 "output=json"]) == 0
    report = json.loads(capsys.readouterr().out)
    spec, plain = report["speculative (MTP drafts)"], report["plain"]
    assert spec["text"] == plain["text"] and spec["tokens"] == plain["tokens"] == 24
    assert 0.0 <= spec["acceptance"] <= 1.0 and spec["main_passes"] <= plain["main_passes"]
    hf_dir = tmp_path / "hf"
    assert main(["convert", f"convert.src={out}/checkpoints/step_00000006", f"convert.dst={hf_dir}"]) == 0
    capsys.readouterr()
    transformers = pytest.importorskip("transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model, _ = load_model(compose(["resume=auto", f"out_dir={out}", "model=tiny"]))
    tok = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = back(tok).logits, model.forward_logits(tok)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_hf_to_hai_checkpoint_resumes(tmp_path, capsys):
    """`hai convert convert.src=hf:DIR` writes a step-0 HAI checkpoint whose weights are the import's."""
    ref = hf_models.v3()
    ref.save_pretrained(tmp_path / "src")
    assert main(["convert", f"convert.src=hf:{tmp_path / 'src'}", f"convert.dst={tmp_path / 'run'}", "cluster=cpu1",
                 "parallel=single", "model.precision=fp32", "wandb.mode=disabled"]) == 0
    info = json.loads(capsys.readouterr().out)
    model, _ = load_model(compose(["resume=auto", f"out_dir={tmp_path / 'run'}"]))
    tok = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model.forward_logits(tok), ref(tok).logits, rtol=1e-5, atol=1e-5)
    assert info["tensors"] > 0
