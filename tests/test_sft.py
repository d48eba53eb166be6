"""Supervised fine-tuning: chat data with a loss mask, packed conversations, the masked loss.

Data: the version-2 token file (a parallel flag array, old files still read), the byte tokenizer's built-in template
and a Hugging Face tokenizer directory's own chat template (tests/chat_fixtures.py) mark exactly the assistant turns
and their EOS as targets; `hai prepare data.format=chat` packs conversations without splitting one and counts bad rows
by kind (refused by name under data.on_error=fail).
"""

import json

import numpy as np
import pytest
import torch

from chat_fixtures import tokenizer_dir, write_jsonl
from hai.cli import main
from hai.config import DataConfig
from hai.data import DataError, Sampler, TokenFile, write_token_file
from hai.data.chat import ByteChatTemplate, ChatError, conversation, load_chat_template
from hai.data.chat_prepare import Packer, prepare_chat
from hai.data.tokens import START, TARGET
from hai.model.batch import doc_starts, target_ids, token_ids

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."}]


# ------------------------------------------------------------------------------------------------ token files
def test_token_file_version_2_round_trip_and_version_1_still_reads(tmp_path):
    tokens = np.arange(24) % 7
    flags = np.array([START, 0, TARGET, TARGET | START] * 6, np.uint8)
    old = TokenFile.open(write_token_file(tmp_path / "v1.haitok", tokens, 257, "byte", 256))
    assert old.mask is None and old.window == 0 and list(old.tokens) == list(tokens)
    assert json.loads(open(tmp_path / "v1.haitok", "rb").read()[12:200].split(b"}")[0] + b"}")["version"] == 1
    new = TokenFile.open(write_token_file(tmp_path / "v2.haitok", tokens, 257, "byte", 256, mask=flags, window=12,
                                          pad_id=256))
    assert list(new.tokens) == list(tokens) and list(new.mask) == list(flags)
    assert (new.window, new.pad_id, new.num_docs) == (12, 256, 12)
    data = open(tmp_path / "v2.haitok", "rb").read()
    open(tmp_path / "cut.haitok", "wb").write(data[:-3])  # the flags lose their tail
    with pytest.raises(DataError, match="truncated.*and flags"):
        TokenFile.open(tmp_path / "cut.haitok")
    newer = data.replace(b'"version": 2', b'"version": 9')
    open(tmp_path / "newer.haitok", "wb").write(newer)
    with pytest.raises(DataError, match="version-9 token file; this HAI reads versions 1..2"):
        TokenFile.open(tmp_path / "newer.haitok")


# ------------------------------------------------------------------------------------------------ templates
def _targets(template, messages):
    ids, target = template.render(messages)
    return ids, target


def test_byte_template_targets_are_the_assistant_turns_and_their_eos():
    t = ByteChatTemplate()
    ids, target = t.render(CONV)
    text = bytes(int(i) for i in ids if i < 256).decode()
    assert text == ("<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>Hello!<|user|>What is 2 + 3?\n"
                    "<|assistant|>2 + 3 = 5.")
    spans = np.flatnonzero(np.diff(np.concatenate([[0], target.astype(int), [0]])))
    got = [list(ids[a:z]) for a, z in zip(spans[::2], spans[1::2])]
    assert got == [list(b"Hello!") + [256], list(b"2 + 3 = 5.") + [256]]
    # inference renders the same tokens: the prompt of the first turns, then the model's answer and EOS
    first = t.prompt(CONV[:2])
    assert list(ids[: len(first)]) == first and list(ids[len(first): len(first) + 7]) == list(b"Hello!") + [256]


def test_hf_tokenizer_directory_chat_template_targets(tmp_path):
    t = load_chat_template(tokenizer_dir(tmp_path))
    ids, target = t.render(CONV)
    assert t.eos_id == t._tok.token_to_id("<｜end▁of▁sentence｜>") and ids[0] == t._tok.token_to_id(
        "<｜begin▁of▁sentence｜>")
    decode = lambda xs: t._tok.decode([int(x) for x in xs], skip_special_tokens=False)  # noqa: E731
    spans = np.flatnonzero(np.diff(np.concatenate([[0], target.astype(int), [0]])))
    assert [decode(ids[a:z]) for a, z in zip(spans[::2], spans[1::2])] == [
        "Hello!<｜end▁of▁sentence｜>", "2 + 3 = 5.<｜end▁of▁sentence｜>"]
    assert decode(ids) == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi!<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                           "<｜User｜>What is 2 + 3?<｜Assistant｜>2 + 3 = 5.<｜end▁of▁sentence｜>")
    prompt = t.prompt(CONV[:4])  # the generation prompt of the last turn is a prefix of the training tokens
    assert list(ids[: len(prompt)]) == prompt and target[len(prompt)] and not target[len(prompt) - 1]


def test_bad_conversations_are_refused_by_kind(tmp_path):
    cases = {"malformed": [{"messages": "hi"}, {"prompt": "x"}, [1, 2], {"messages": [{"role": "user"}]}],
             "unknown_role": [{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}],
             "no_assistant": [{"messages": [{"role": "user", "content": "x"}]}]}
    for kind, rows in cases.items():
        for row in rows:
            with pytest.raises(ChatError) as e:
                conversation(row)
            assert e.value.kind == kind, row
    refusing = tokenizer_dir(tmp_path, template="{{ raise_exception('no system role here') if messages[0]"
                                                "['role'] == 'system' else 'x' }}")
    with pytest.raises(ChatError, match="no system role here") as e:
        load_chat_template(refusing).render(CONV)
    assert e.value.kind == "template_error"


# ------------------------------------------------------------------------------------------------ prepare
def _bad_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}."} for i in range(20)]
    rows = good[:10] + ["{not json", {"messages": [{"role": "user", "content": "no answer"}]},
                        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                        {"prompt": "long " * 40, "completion": "x"}] + good[10:]
    write_jsonl(src / "a.jsonl", rows)
    (src / "empty.jsonl").write_text("\n")
    return src


def test_prepare_chat_counts_bad_rows_or_refuses_them_by_name(tmp_path, capsys):
    src = _bad_source(tmp_path)
    cfg = DataConfig(format="chat", source=str(src), workers=1)
    with pytest.raises(DataError, match=r"a\.jsonl line 11 is not JSON.*\[malformed\].*data\.on_error=skip"):
        prepare_chat(cfg, 64, str(tmp_path / "x.haitok"))
    r = prepare_chat(DataConfig(format="chat", source=str(src), workers=1, on_error="skip"), 64,
                     str(tmp_path / "ok.haitok"))
    assert r["bad_rows"] == {"malformed": 1, "unknown_role": 1, "no_assistant": 1, "too_long": 1, "empty_file": 1}
    assert r["conversations"] == 20 and r["rows"] == 24 and r["truncated"] == 0
    assert "a.jsonl line 14 renders to" in r["bad_examples"]["too_long"][0]
    cut = prepare_chat(DataConfig(format="chat", source=str(src), workers=1, on_error="skip", truncate=True), 64,
                       str(tmp_path / "cut.haitok"))
    assert cut["truncated"] == 1 and cut["conversations"] == 21 and "too_long" not in cut["bad_rows"]
    assert main(["prepare", "data.format=chat", f"data.source={src}", "data.on_error=skip", "train.seq_len=64",
                 f"data.path={tmp_path / 'cli.haitok'}", "data.workers=1"]) == 0
    out = capsys.readouterr().out
    assert "20 conversations" in out and "malformed 1, unknown_role 1, no_assistant 1, too_long 1, empty_file 1" in out
    (tmp_path / "none").mkdir()
    write_jsonl(tmp_path / "none" / "a.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert main(["prepare", "data.format=chat", f"data.source={tmp_path / 'none'}", "data.on_error=skip",
                 f"data.path={tmp_path / 'n.haitok'}"]) == 2
    assert "produced no conversations" in capsys.readouterr().err


def _conversations_of(tf: TokenFile):
    """Every conversation of a chat file: (tokens, target flags), read back from the START flags."""
    out = []
    for w in range(len(tf) // tf.window):
        tok, fl = tf.tokens[w * tf.window:(w + 1) * tf.window], tf.mask[w * tf.window:(w + 1) * tf.window]
        starts = list(np.flatnonzero(fl & START)) + [tf.window]
        for a, z in zip(starts[:-1], starts[1:]):
            if tok[a] != tf.pad_id:
                out.append((tuple(tok[a:z]), tuple(fl[a:z] & TARGET)))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_packing_keeps_every_conversation_whole(tmp_path, pack):
    rows = [{"prompt": "q" * (2 + i % 23), "completion": "a" * (1 + (7 * i) % 17)} for i in range(300)]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    r = prepare_chat(DataConfig(format="chat", source=src, workers=1, pack=pack), 127, str(tmp_path / "p.haitok"))
    tf = TokenFile.open(r["path"])
    t = ByteChatTemplate()
    want = sorted((tuple(ids), tuple(tg.astype(np.uint8))) for ids, tg in (t.render(conversation(x)) for x in rows))
    got = _conversations_of(tf)
    assert sorted(got) == want  # each conversation once, whole, with its targets
    assert r["windows"] == len(tf) // 128 and r["conversation_tokens"] == sum(len(a) for a, _ in want)
    assert r["packing_efficiency"] == pytest.approx(r["conversation_tokens"] / (128 * r["windows"]))
    assert r["target_fraction"] == pytest.approx(sum(int(sum(b)) for _, b in want) / (128 * r["windows"]))
    if pack:  # 116 windows (efficiency 0.91); no packing can use fewer than 106 (the tokens / 128)
        assert r["windows"] <= 1.1 * np.ceil(r["conversation_tokens"] / 128)
    else:
        assert r["windows"] == 300


def test_packer_best_fit_never_splits_a_conversation():
    p = Packer(10, True, 0, open_windows=2)
    parts = [np.full(n, n, np.uint32) for n in (6, 5, 4, 3, 2, 7, 1)]
    windows = [w for ids in parts for w in p.add(ids, np.ones(len(ids), bool))] + p.finish()
    for tokens, flags, n in windows:
        starts = np.flatnonzero(flags & START)
        lengths = np.diff(np.concatenate([starts, [10]]))
        assert all(tokens[a] == 0 or tokens[a] == ln for a, ln in zip(starts, lengths))  # whole, or padding
    assert sorted(n for _, _, n in windows) == [2, 2, 3]  # 6+4 (closed when 7 opened a third), 5+3+2, 7+1


def test_chat_windows_carry_flags_and_the_seq_len_they_were_packed_for(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}] * 30)
    path = prepare_chat(DataConfig(format="chat", source=src, workers=1), 127, str(tmp_path / "c.haitok"))["path"]
    tf = TokenFile.open(path)
    rows = Sampler(tf, 127, 4, 0).micro_batches(0, 0, 1, 4)[0]
    ids, target = ByteChatTemplate().render(CONV)
    for row in rows:
        assert bool(doc_starts(row[:1])) and list(token_ids(row[: len(ids)])) == list(ids)
        got = target_ids(row[None])[0, : len(ids) - 1]  # position i predicts token i+1
        assert list(got >= 0) == list(target[1:])
    with pytest.raises(DataError, match="prepared for train.seq_len=127, but train.seq_len=64.*data.format=chat "
                                        "train.seq_len=64"):
        Sampler(tf, 64, 4, 0)


def test_target_ids_stop_at_document_starts():
    D, T = 1 << 33, 1 << 32  # DOC_START, NOT_TARGET
    row = torch.tensor([[D | T | 5, 6, 7, D | T | 8, 9, 10, 11]])  # two documents: 5 6 7 | 8 9 10 11
    assert target_ids(row, 0).tolist() == [[6, 7, -1, 9, 10, 11]]  # 8 starts a document: not a target
    assert target_ids(row, 1).tolist() == [[7, -1, -1, 10, 11]]  # 7 -> 9 is a target of the next document
    plain = torch.tensor([[1, 2, 3, 4]])
    assert target_ids(plain, 0).tolist() == [[2, 3, 4]] and target_ids(plain, 1).tolist() == [[3, 4]]


# ------------------------------------------------------------------------------------------------ the loss
def _hf_chat_setup(tmp_path, n_rows=24, seq_len=48):
    """A tiny transformers DeepSeek-V3 (+ the release's MTP layer), the tokenizer directory beside it, and a chat
    file of short conversations in windows of seq_len+1 (one conversation per window, padded: the layout
    transformers can run as is)."""
    import hf_models
    from hai.data.chat_corpus import conversations

    ref = hf_models.v3()
    ref.save_pretrained(tmp_path / "src")
    hf_models.add_mtp_layer(ref, str(tmp_path / "src"))
    tok = tokenizer_dir(tmp_path / "src")
    template = load_chat_template(tok)
    rows = [r for r in conversations(200, seed=3) if len(template.render(conversation(r))[0]) <= seq_len + 1]
    rows = rows[:n_rows]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    path = prepare_chat(DataConfig(format="chat", source=src, tokenizer=tok, workers=1, pack=False), seq_len,
                        str(tmp_path / "chat.haitok"))["path"]
    return ref, tok, path


def _sft_overrides(tmp_path, tok, path, seq_len=48, gb=8):
    return ["train=sft", f"model.init_from=hf:{tmp_path / 'src'}", "model.precision=fp32", f"data.path={path}",
            f"data.tokenizer={tok}", "data.val_fraction=0.34", f"train.seq_len={seq_len}",
            f"train.global_batch_size={gb}", "train.epochs=0", "train.steps=1", "train.eval_every=1",
            "train.eval_batches=2", "train.save_every=0", "train.progress=false", "wandb.mode=disabled",
            f"out_dir={tmp_path / 'run'}"]


def _sft_first_step(rank, world, overrides):
    from hai.config.compose import compose
    from hai.parallel import Topology
    from hai.train.trainer import Trainer, init_distributed, load_data

    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    tr = Trainer(cfg, topo, init_distributed(topo), load_data(cfg))
    val = tr.evaluate()["val_loss"]  # the imported weights, before any update
    rec = tr.train_step()
    return rec["loss"], rec["target_tokens"], val


@pytest.mark.multiproc
@pytest.mark.parametrize("layout, world", [("single", 1), ("pp2_1f1b_dp2_ep2", 4), ("pp2_dualpipe_dp2_ep2", 4),
                                           ("cp2_dp2_ep2", 4)])
def test_sft_step_0_loss_equals_transformers_masked_loss(layout, world, tmp_path):
    """`hai train train=sft model.init_from=hf:DIR`: the masked loss of the first step equals transformers' loss with
    labels=-100 on every position that is not an assistant token or its EOS, over the same global batch (fp32),
    in one process, under pp=2 (1F1B; DualPipe, overlap on) x dp=2 x ep=2 and under cp=2 x dp=2 x ep=2, where the 8
    windows are 4 micro-batches of 1 per dp rank with different target counts: the per-token normalization over
    micro-batches, dp and cp ranks is what matches. The held-out masked loss (2 batches of the chat data's held-out
    windows) equals transformers' on those windows."""
    from dist_utils import run_ranks

    ref, tok, path = _hf_chat_setup(tmp_path)
    ov = _sft_overrides(tmp_path, tok, path)
    ov += ["cluster=cpu1", "parallel=single", "train.micro_batch_size=2"] if layout == "single" else [
        "cluster=local_cpu", "parallel=local", "parallel.dp=2", "parallel.ep=2", "parallel.node_limit=0",
        "parallel.dispatch=flat", "train.micro_batch_size=1"]
    if layout.startswith("pp2"):
        ov += ["parallel.pp=2", f"parallel.schedule={layout.split('_')[1]}"]
    if layout.startswith("cp2"):  # each rank holds 2 of the window's 4 zig-zag chunks of 12 positions
        ov += ["parallel.cp=2"]
    from hai.config.compose import compose
    from hai.train.trainer import load_data

    cfg = compose(ov)
    data = load_data(cfg)
    windows = Sampler(data.train, 48, 8, cfg.train.seed).sequences(0, 0, 8)  # the step-0 global batch
    held_out = torch.cat([Sampler(data.val, 48, 8, cfg.train.seed).sequences(i, 0, 8) for i in range(2)])
    want, want_val = _hf_masked_loss(ref, windows), _hf_masked_loss(ref, held_out)
    ids = token_ids(windows)
    labels = torch.where((windows & (1 << 32)) != 0, torch.full_like(ids, -100), ids)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits[:, :-1]
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    valid = (labels[:, 1:] != -100).flatten()
    per_seq = (per_token * valid).view(8, -1).sum(1) / valid.view(8, -1).sum(1)
    assert abs(per_seq.mean().item() - want) > 1e-4 * want  # a per-sequence mean is 10x the tolerance off (3e-4)
    for loss, n_targets, val in run_ranks(_sft_first_step, world, ov):
        assert n_targets == int(valid.sum())
        assert loss == pytest.approx(want, rel=1e-5) and val == pytest.approx(want_val, rel=1e-5)


def _hf_masked_loss(ref, windows) -> float:
    """transformers' loss with labels=-100 where a token is not a target (the flags of hai.model.batch)."""
    ids = token_ids(windows)
    labels = torch.where((windows & (1 << 32)) != 0, torch.full_like(ids, -100), ids)
    with torch.no_grad():
        return ref(input_ids=ids, labels=labels).loss.item()


def _per_token_losses(model, window, monkeypatch):
    """Per-token cross-entropies of the main loss and MTP depth 1 of one forward over ``window`` (1, W), recorded
    from the logits and targets the model's losses see (-1: not a target)."""
    import hai.model.transformer as tr

    seen = []
    original = tr.cross_entropy
    monkeypatch.setattr(tr, "cross_entropy", lambda logits, t: seen.append((logits.detach(), t)) or original(logits, t))
    with torch.no_grad():
        model(window)
    monkeypatch.setattr(tr, "cross_entropy", original)
    out = []
    for logits, t in seen:  # main, then MTP depth 1
        ce = torch.nn.functional.cross_entropy(logits.double(), t.clamp_min(0), reduction="none")
        out.append(torch.where(t >= 0, ce, torch.full_like(ce, float("nan"))))
    return out


def test_packed_window_gives_each_conversation_its_own_per_token_losses(monkeypatch):
    """Three conversations packed into one window (document mask, RoPE positions restarting per conversation) give,
    token for token, the main and MTP losses of each conversation run alone; without the mask they do not."""
    from hai.config.compose import compose
    from hai.data.chat_corpus import conversations
    from hai.model import build_model
    from hai.model.sequence import DocumentSpec

    cfg = compose(["model=tiny", "model.precision=fp32"]).model
    model = build_model(cfg, seed=0).eval()
    t = ByteChatTemplate()
    convs = [t.render(conversation(r)) for r in conversations(3, seed=5)]
    packer = Packer(sum(len(i) for i, _ in convs) + 5, True, 256)
    for ids, target in convs:
        packer.add(ids, target)
    (window, flags, n), = packer.finish()
    assert n == 3

    def flagged(tokens, fl):
        from hai.data.sampler import _flagged
        return torch.from_numpy(_flagged(tokens, fl))[None]

    model.doc_spec = DocumentSpec(256, mask=True, reset=True, marked=True)
    packed = _per_token_losses(model, flagged(window, flags), monkeypatch)
    at = 0
    for ids, target in convs:
        fl = np.where(target, TARGET, 0).astype(np.uint8)
        fl[0] |= START
        alone = _per_token_losses(model, flagged(ids, fl), monkeypatch)
        for k, (p, a) in enumerate(zip(packed, alone)):  # position i of the conversation: packed at + i
            got = p[at: at + len(a)]
            ok = ~torch.isnan(a)
            assert ok.sum() > 5 and torch.equal(torch.isnan(got), ~ok), k
            assert torch.allclose(got[ok], a[ok], rtol=1e-5, atol=0), k
        at += len(ids)
    assert torch.isnan(packed[0][at:]).all()  # the padding: no targets
    model.doc_spec = None  # the same window attending across conversations: other losses
    crossed = _per_token_losses(model, flagged(window, flags), monkeypatch)[0]
    ok = ~torch.isnan(crossed)
    assert not torch.allclose(crossed[ok], packed[0][ok], rtol=1e-3)


def _events(run) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_sft_from_a_hai_pretraining_checkpoint(tmp_path, capsys):
    """`hai train train=sft resume=PRETRAIN_RUN`: the pre-training weights only (the first SFT step is step 1 and its
    loss is the pre-trained model's masked loss on that batch, computed here from its plain logits), train.epochs
    sets the steps; the same command again resumes the SFT run's own checkpoint; `hai generate
    generate.chat=true` answers a user turn rendered with the same template."""
    from hai.checkpoint.load import load_model
    from hai.config.compose import compose
    from hai.data.chat_corpus import conversations
    from hai.train.trainer import load_data

    common = ["cluster=cpu1", "parallel=single", "wandb.mode=disabled", "train.progress=false"]
    assert main(["train", "train=test", "train.steps=2", "train.save_every=2", f"out_dir={tmp_path / 'pre'}",
                 *common]) == 0
    src = write_jsonl(tmp_path / "c.jsonl", conversations(200, seed=1))
    chat = prepare_chat(DataConfig(format="chat", source=src, workers=1, pack=False), 128, str(tmp_path / "c.haitok"))
    sft = ["train", "train=sft", f"resume={tmp_path / 'pre'}", f"data.path={chat['path']}", "train.epochs=0.1",
           "train.eval_every=0", "train.save_every=2", f"out_dir={tmp_path / 'sft'}", *common]
    assert main(sft) == 0
    recs = _events(tmp_path / "sft")
    resumed = [r for r in recs if r.get("event") == "resumed"][0]
    assert resumed["weights_only"] and resumed["path"].endswith("step_00000002")
    steps = [r for r in recs if "loss" in r]
    cfg = compose(sft[1:])
    data = load_data(cfg)
    assert [r["step"] for r in steps] == [1, 2] == list(range(1, 1 + int(np.ceil(0.1 * data.train.n_windows / 16))))
    model, _ = load_model(compose(["train=test", f"resume={tmp_path / 'pre'}", f"out_dir={tmp_path / 'pre'}"]))
    windows = Sampler(data.train, 128, 16, cfg.train.seed).sequences(0, 0, 16)
    targets = target_ids(windows)
    with torch.no_grad():
        logits = model.forward_logits(token_ids(windows[:, :-1]))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert steps[0]["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert steps[0]["target_tokens"] == int((targets >= 0).sum())
    assert main([*sft, "train.epochs=0.3"]) == 0  # the same run, longer (4 steps): continues from its step-2 save
    recs = _events(tmp_path / "sft")
    assert [r["step"] for r in recs if "loss" in r][-2:] == [3, 4]
    assert not [r for r in recs if r.get("event") == "resumed"][-1].get("weights_only")
    capsys.readouterr()
    assert main(["generate", f"resume={tmp_path / 'sft'}", "generate.chat=true", "generate.prompt=Hello",
                 "generate.max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.startswith("user: Hello\nassistant: ")


def test_generation_stops_at_the_chat_eos():
    from hai.config.compose import compose
    from hai.inference.generate import generate
    from hai.model import build_model

    model = build_model(compose(["model=tiny"]).model, seed=0).eval()
    prompt = ByteChatTemplate().prompt([{"role": "user", "content": "Hi!"}])
    free = generate(model, prompt, 6).tokens
    assert len(free) == 6
    assert generate(model, prompt, 6, stop=(free[2],)).tokens == free[:2]
    assert generate(model, prompt, 6, speculative=True, stop=(free[2],)).tokens == free[:2]


def test_parquet_rows_and_worker_processes_give_the_same_windows(tmp_path):
    """Chat rows from parquet (a messages column of structs, prompt/completion columns) read like jsonl rows; two
    worker processes (`hai prepare` in a fresh interpreter) write the same file as one."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hai.data.chat_corpus import conversations

    rows = conversations(60, seed=2)
    chats = [r for r in rows if "messages" in r]
    pairs = [r for r in rows if "prompt" in r]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "pq" / "a.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pq" / "b.parquet")
    (tmp_path / "js").mkdir()
    write_jsonl(tmp_path / "js" / "a.jsonl", chats)
    write_jsonl(tmp_path / "js" / "b.jsonl", pairs)
    a = prepare_chat(DataConfig(format="chat", source=str(tmp_path / "pq"), workers=1), 128, str(tmp_path / "p.haitok"))
    b = prepare_chat(DataConfig(format="chat", source=str(tmp_path / "js"), workers=1), 128, str(tmp_path / "j.haitok"))
    assert a["conversations"] == 60 and a["bad_rows"] == {}
    assert open(a["path"], "rb").read() == open(b["path"], "rb").read()
    out = tmp_path / "w2.haitok"
    subprocess.run([sys.executable, "-m", "hai.cli", "prepare", "data.format=chat", f"data.source={tmp_path / 'js'}",
                    "data.workers=2", "train.seq_len=128", f"data.path={out}", "output=json"], check=True,
                   capture_output=True)
    assert open(out, "rb").read() == open(b["path"], "rb").read()
