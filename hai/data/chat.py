"""Chat data: conversations rendered with a chat template into token ids and a loss mask.

Rows (jsonl lines or parquet rows) come in two forms: ``{"messages": [{"role", "content"}, ...]}`` (roles
``system``, ``user``, ``assistant``) and ``{"prompt", "completion"}`` (a user turn and the assistant's answer; an
optional ``"system"``). Each conversation is rendered with the tokenizer's own template, and only the assistant
turns' tokens, with the token(s) that end each turn (EOS), are loss targets.

Templates (:func:`load_chat_template`):

- ``data.tokenizer=byte``: the built-in template ``byte-chat-v1``, on token ids: ``<|system|>`` + content + ``\\n``,
  ``<|user|>`` + content + ``\\n``, ``<|assistant|>`` + content + EOS (id 256); the generation prompt is
  ``<|assistant|>``. Targets: each assistant content and its EOS.
- ``data.tokenizer=DIR/tokenizer.json``: the ``chat_template`` of ``DIR/tokenizer_config.json`` (or
  ``DIR/chat_template.jinja``), rendered as ``transformers`` renders it (its own renderer when installed, else jinja2
  with the same sandbox and options), with the config's ``bos_token`` / ``eos_token``. Turn i's targets are the
  characters that rendering messages[:i+1] adds to rendering messages[:i] with the generation prompt; the whole
  conversation is tokenized once (``tokenizers``, no special tokens added) and a token is a target when its first
  character is. A template whose renderings are not prefixes of each other is a ``template_error``.

A row that cannot become a conversation raises :class:`ChatError` with its kind (:data:`KINDS`);
``hai.data.chat_prepare`` (``hai prepare data.format=chat``) counts them, applies ``data.on_error`` and packs
the conversations into windows.
"""

from __future__ import annotations

import json
import os

import numpy as np

from hai.data.tokenizer import check_tokenizer_spec, load_tokenizer
from hai.data.tokens import DataError

__all__ = ["ChatError", "KINDS", "ROLES", "conversation", "load_chat_template", "ByteChatTemplate",
           "HFChatTemplate"]

ROLES = ("system", "user", "assistant")
KINDS = ("malformed", "unknown_role", "no_assistant", "template_error", "too_long", "empty_file", "unreadable")


class ChatError(ValueError):
    """A row that cannot become a training conversation; ``kind`` is one of :data:`KINDS`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def conversation(rec) -> list[dict]:
    """The messages of a row (either form), checked: known roles, string contents, an assistant turn."""
    if not isinstance(rec, dict):
        raise ChatError("malformed", f"is a JSON {type(rec).__name__}, not an object with 'messages' or "
                                     f"'prompt'/'completion'")
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatError("malformed", "has 'messages' that is not a non-empty list")
    elif "prompt" in rec and "completion" in rec:
        messages = ([{"role": "system", "content": rec["system"]}] if rec.get("system") is not None else []) + [
            {"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
    else:
        raise ChatError("malformed", f"has neither 'messages' nor 'prompt' and 'completion' (keys: {sorted(rec)})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatError("malformed", f"message {i} is not {{'role': str, 'content': str}}: {str(m)[:80]}")
        if m["role"] not in ROLES:
            raise ChatError("unknown_role", f"message {i} has role {m['role']!r}, not one of {list(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError("no_assistant", "has no assistant turn (nothing to learn)")
    return out


class ByteChatTemplate:
    """The byte tokenizer's built-in template (module docstring), rendered directly on token ids."""

    name = "byte-chat-v1"
    HEADS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

    def __init__(self):
        self.tok = load_tokenizer("byte")
        self.eos_id = self.pad_id = self.tok.eos_id
        self.stop_ids = (self.tok.eos_id,)

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint32, target bool) of a whole conversation."""
        ids: list[int] = []
        target: list[bool] = []
        for m in messages:
            head = self.tok.encode(self.HEADS[m["role"]])
            body = self.tok.encode(m["content"])
            tail = [self.eos_id] if m["role"] == "assistant" else self.tok.encode("\n")
            is_target = m["role"] == "assistant"
            ids += head + body + tail
            target += [False] * len(head) + [is_target] * (len(body) + len(tail))
        return np.asarray(ids, np.uint32), np.asarray(target, bool)

    def prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` followed by the generation prompt (the start of the assistant's turn)."""
        ids, _ = self.render(messages) if messages else (np.zeros(0, np.uint32), None)
        return [int(i) for i in ids] + self.tok.encode(self.HEADS["assistant"])


def _special(value) -> str | None:
    """A tokenizer_config special token: a string or {"content": string}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_template(directory: str) -> tuple[str, dict]:
    """(chat template source, tokenizer_config) of a tokenizer directory."""
    config: dict = {}
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja = os.path.join(directory, "chat_template.jinja")
    if not template and os.path.isfile(jinja):
        with open(jinja) as f:
            template = f.read()
    if not isinstance(template, str) or not template:
        raise DataError(f"data.tokenizer's directory {directory!r} has no chat template (no 'chat_template' in "
                        f"tokenizer_config.json, no chat_template.jinja): add one, or use data.tokenizer=byte "
                        f"(the built-in template)")
    return template, config


def _jinja_renderer(template: str):
    """render(messages, add_generation_prompt, **special tokens) -> str, as transformers renders chat templates."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        def render(messages, add_generation_prompt, **kw):
            return render_jinja_template([messages], chat_template=template,
                                         add_generation_prompt=add_generation_prompt, **kw)[0][0]
        return render
    except ImportError:
        pass
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages, add_generation_prompt, **kw):
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **kw)
    return render


class HFChatTemplate:
    """The chat template of a Hugging Face tokenizer directory (module docstring)."""

    def __init__(self, tokenizer_json: str):
        directory = os.path.dirname(os.path.abspath(tokenizer_json))
        source, config = _read_template(directory)
        self.name = f"{tokenizer_json}:chat_template"
        self.tok = load_tokenizer(tokenizer_json)
        self._tok = self.tok._tok  # the tokenizers.Tokenizer: encodings with character offsets
        self.special = {k: _special(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.special = {k: v for k, v in self.special.items() if v is not None}
        eos = self.special.get("eos_token")
        self.eos_id = self._tok.token_to_id(eos) if eos else self.tok.eos_id
        if self.eos_id is None:
            raise DataError(f"{directory}/tokenizer_config.json names eos_token {eos!r}, which {tokenizer_json!r} "
                            f"does not have: fix the tokenizer directory")
        pad = self.special.get("pad_token")
        self.pad_id = self._tok.token_to_id(pad) if pad and self._tok.token_to_id(pad) is not None else self.eos_id
        self.stop_ids = (self.eos_id,)
        self._render = _jinja_renderer(source)

    def text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._render(messages, add_generation_prompt, **self.special)
        except Exception as e:  # noqa: BLE001 - jinja's and the template's own exceptions
            raise ChatError("template_error", f"the chat template failed: {type(e).__name__}: {e}") from None

    def _target_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        full = self.text(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.text(messages[:i], True), self.text(messages[: i + 1], False)
            if not upto.startswith(before) or not full.startswith(upto):
                raise ChatError("template_error", f"the chat template does not render turn {i} as an extension of "
                                                  f"the turns before it (so its targets cannot be located)")
            spans.append((len(before), len(upto)))
        return full, spans

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint32, target bool) of a whole conversation."""
        full, spans = self._target_spans(messages)
        enc = self._tok.encode(full, add_special_tokens=False)
        first = np.asarray([a for a, _ in enc.offsets], dtype=np.int64)
        target = np.zeros(len(first), bool)
        for a, z in spans:
            target |= (first >= a) & (first < z)
        return np.asarray(enc.ids, np.uint32), target

    def prompt(self, messages: list[dict]) -> list[int]:
        return list(self._tok.encode(self.text(messages, True), add_special_tokens=False).ids)


def load_chat_template(tokenizer: str):
    """The chat template of ``data.tokenizer``: built-in for ``byte``, else the tokenizer directory's own."""
    check_tokenizer_spec(tokenizer)
    return ByteChatTemplate() if tokenizer == "byte" else HFChatTemplate(tokenizer)
