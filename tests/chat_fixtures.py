"""A tiny Hugging Face tokenizer directory built offline for the SFT tests: a byte-level BPE of 320 tokens trained
on the synthetic chat corpus with DeepSeek-V3's special tokens, and a chat template in the release's shape (its
``tokenizer_config.json`` template without the tool-call branches): BOS, system text, ``<｜User｜>`` + content,
``<｜Assistant｜>`` + content + ``<｜end▁of▁sentence｜>``, the generation prompt ``<｜Assistant｜>``."""

from __future__ import annotations

import json
import os

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
V3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
               "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
               "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


def tokenizer_dir(path, template: str = V3_TEMPLATE, vocab_size: int = 320) -> str:
    """Write tokenizer.json + tokenizer_config.json under ``path``; returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hai.data.chat_corpus import conversations

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rows = conversations(500)
    texts = [m["content"] for r in rows for m in r.get("messages", [])] + \
            [r["prompt"] + r["completion"] for r in rows if "prompt" in r]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": {"content": EOS}, "chat_template": template}, f)
    return os.path.join(str(path), "tokenizer.json")


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)
