"""Bad configurations fail with a message that names the value and the fix."""

import pytest

from hai.cli import main
from hai.config import ConfigError
from hai.config.compose import compose
from hai.parallel import Topology


@pytest.mark.parametrize("overrides, fragment", [
    (["model.bogus=1"], "unknown key 'model.bogus'"),
    (["+model.bogus=1"], "bypasses HAI's schema"),
    (["model=nope"], "Could not find 'model/nope'"),
    (["train.micro_batch_size=3"], "train.global_batch_size=16 is not divisible by train.micro_batch_size=3"),
    (["model.n_group=3"], "model.n_group=3 must divide model.n_routed_experts=8"),
    (["model.topk_group=3"], "model.topk_group=3 must lie in [1, n_group=2]"),
    (["model.precision=fp16"], "model.precision='fp16' is not one of"),
    (["parallel.schedule=gpipe"], "parallel.schedule='gpipe'"),
    (["model.qk_rope_head_dim=7"], "qk_rope_head_dim=7 must be even"),
    (["train.min_lr=1.0"], "train.min_lr=1.0 must lie in"),
    (["wandb.mode=maybe"], "wandb.mode='maybe'"),
])
def test_bad_config_messages(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert fragment in str(e.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=3"],
     "world size 4 (cluster.nodes=2 x cluster.gpus_per_node=2) != parallel.pp=1 x parallel.dp=3"),
    (["cluster.gpus_per_node=4", "parallel.dp=4", "parallel.ep=3"], "parallel.ep=3 does not divide parallel.dp=4"),
    (["cluster.gpus_per_node=6", "parallel.dp=6", "parallel.ep=6"],
     "parallel.ep=6 does not divide model.n_routed_experts=8"),
    (["cluster.gpus_per_node=8", "parallel.pp=8", "model.num_layers=4"],
     "pp=8 needs at least one layer per stage but the model has num_layers=4"),
    (["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=4", "parallel.ep=4", "parallel.node_limit=3"],
     "parallel.node_limit=3 exceeds the 2 node(s) of an EP group"),
    (["cluster.nodes=4", "cluster.gpus_per_node=2", "parallel.dp=8", "parallel.ep=8", "parallel.node_limit=2"],
     "set model.n_group=4 model.topk_group=2"),
    (["cluster.gpus_per_node=2", "parallel.dp=2", "train.global_batch_size=6", "train.micro_batch_size=2"],
     "train.global_batch_size=6 must be divisible by parallel.dp=2 x train.micro_batch_size=2"),
])
def test_bad_layout_messages(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        Topology.from_config(compose(["cluster=cpu1", "parallel=single", *overrides]))
    assert fragment in str(e.value)


LAYOUT_BASE = ["cluster.gpus_per_node=2", "parallel.dp=1", "parallel.pp=2", "model.num_layers=4"]


@pytest.mark.parametrize("layout, fragment", [
    ("Et*4Lm", "has 1 stage(s) but the schedule runs 2: give exactly 2 stages separated by '|'"),
    ("Et*3|t*2Lm", "places 5 transformer layers but the model has model.num_layers=4: the t counts must add up to 4"),
    ("tE*3|tLm", "stage 0 is 'tE*3': write it with E, t, t*N, L, m"),
    ("t*3|EtLm", "stage 1 ('EtLm'): the embedding E must open stage 0"),
    ("Et*3|tmL", "stage 1 ('tmL'): m (MTP) needs the main model's final state: put it after L"),
    ("Et*3|Lmt", "stage 1 ('Lmt'): transformer layers after L"),
    ("Et*2L|t*2m", "stage 1 ('t*2m'): transformer layers after L"),
    ("Et*3|tL", "lacks m but model.mtp_depth=1: add m after L"),
    ("Et*3|t", "has no L: put the final norm / head / loss (L) on a stage after the last layer"),
])
def test_bad_pipeline_layout_messages(layout, fragment):
    with pytest.raises(ConfigError) as e:
        Topology.from_config(compose(["cluster=cpu1", "parallel=single", *LAYOUT_BASE, f"parallel.layout={layout}"]))
    assert fragment in str(e.value) and "parallel.layout" in str(e.value)


def test_pipeline_layout_accepts_uneven_stages():
    from hai.parallel.layout import PipelineLayout, StageSpec

    cfg = compose(["cluster=cpu1", "parallel=single", *LAYOUT_BASE, "parallel.layout=E|t*4Lm"])
    Topology.from_config(cfg)
    lay = PipelineLayout.from_config(cfg.model, cfg.parallel.schedule, 2, cfg.parallel.layout)
    assert lay.specs == (StageSpec(True, range(0, 0), False, False), StageSpec(False, range(0, 4), True, True))
    assert lay.describe() == "E|t*4Lm"


def test_cli_reports_config_errors(capsys):
    assert main(["train", "train.micro_batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "hai train: error:" in err and "train.micro_batch_size=3" in err


def test_overrides_compose():
    cfg = compose(["model=deepseek_v3_671b", "train.steps=7", "out_dir=/tmp/x"])
    assert cfg.model.hidden_size == 7168 and cfg.train.steps == 7 and cfg.out_dir == "/tmp/x"


def test_production_layout_validates():
    cfg = compose(["model=deepseek_v3_671b", "cluster=h800_2048", "parallel=v3_2048", "train=v3_pretrain"])
    topo = Topology.from_config(cfg)
    assert (topo.world_size, topo.pp, topo.dp, topo.ep, topo.edp, topo.ep_nodes) == (2048, 16, 128, 64, 2, 8)


def test_default_is_multiprocess_local_layout():
    topo = Topology.from_config(compose([]))
    assert topo.world_size == 4 and topo.nodes == 2


@pytest.mark.parametrize("schedule, pp", [("dualpipe", 2), ("1f1b", 2), ("dualpipev", 2), ("1f1b", 4)])
def test_auto_layout_resolves_to_a_valid_layout_no_worse_than_even(schedule, pp):
    """compose resolves parallel.layout=auto to explicit text (what config.yaml records and a run executes); its
    busiest rank carries no more forward compute than under the even split."""
    from hai.parallel.layout import PipelineLayout
    from hai.plan.layout import rank_loads

    ov = ["cluster=cpu1", "parallel=single", f"cluster.gpus_per_node={pp}", "parallel.dp=1", f"parallel.pp={pp}",
          f"parallel.schedule={schedule}"]
    cfg = compose([*ov, "parallel.layout=auto"])
    assert cfg.parallel.layout not in ("", "auto")
    Topology.from_config(cfg)
    lay = PipelineLayout.from_config(cfg.model, schedule, pp, cfg.parallel.layout)
    even = PipelineLayout.from_config(cfg.model, schedule, pp, "")
    assert max(rank_loads(cfg, lay.specs)) <= max(rank_loads(cfg, even.specs)) * (1 + 1e-9)
