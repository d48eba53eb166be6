"""`hai generate`: sample from a model with the latent KV cache and absorbed decode, optionally with MTP drafts.

Sampling: greedy (``temperature=0``), or temperature with top-p (nucleus) filtering.

Speculative decoding with the MTP module (DeepSeek-V3 §5.4.3): after the main model samples token t_n, MTP depth 1
drafts t_{n+1} from the main model's state at n-1 and t_n; the main model then runs t_n and the draft together. It
samples its own t_{n+1} from its logits at t_n, exactly as plain decoding would; if that equals the draft, the draft's
logits are already computed and the step yielded two tokens for one main-model pass, otherwise the draft's cache
entry is dropped and the sampled token is kept. Every token the output contains is sampled from the main model's
distribution, so greedy speculative decoding reproduces greedy plain decoding token for token. The MTP block keeps
its own latent cache (its layer id in the same ``KVCache``), fed each main-model state once its next token is known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hai.model.attention import KVCache

__all__ = ["GenerateResult", "generate", "sample"]


@dataclass
class GenerateResult:
    tokens: list[int]  # the new tokens
    seconds: float
    main_passes: int  # forward passes of the main model after the prompt
    drafts: int = 0
    accepted: int = 0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / max(self.seconds, 1e-9)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0


def sample(logits_V: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One token from (V,) logits: argmax at temperature 0, else temperature + top-p."""
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(descending=True)
        keep = p_sorted.cumsum(0) - p_sorted < top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p_sorted[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(model, prompt: list[int], max_new: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, speculative: bool = False, stop: tuple[int, ...] = ()) -> GenerateResult:
    """New tokens after ``prompt`` (batch of one) from ``model`` (a whole ``Transformer`` in eval mode), ending at
    ``max_new`` tokens or at a token of ``stop`` (a chat turn's EOS; not part of the result)."""
    if speculative and not model.mtp:
        raise ValueError("generate.speculative=true needs a model with MTP modules (model.mtp_depth >= 1)")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache()
    t0 = time.perf_counter()
    h, logits = model.decode(torch.tensor([prompt], device=device), cache)
    if not speculative:
        out, passes = [], 0
        while len(out) < max_new:
            out.append(sample(logits[0, -1], temperature, top_p, gen))
            if out[-1] in stop:
                return GenerateResult(out[:-1], time.perf_counter() - t0, passes)
            if len(out) < max_new:
                h, logits = model.decode(torch.tensor([[out[-1]]], device=device), cache)
                passes += 1
        return GenerateResult(out, time.perf_counter() - t0, passes)
    res = _speculative(model, prompt, max_new, temperature, top_p, gen, cache, h, logits, t0, stop)
    ends = [i for i, x in enumerate(res.tokens) if x in stop]
    res.tokens = res.tokens[: ends[0]] if ends else res.tokens
    return res


def _speculative(model, prompt, max_new, temperature, top_p, gen, cache, h, logits, t0, stop=()) -> GenerateResult:
    device = h.device
    tokens = list(prompt)
    res = GenerateResult([], 0.0, 0)
    waiting = h  # main-model states whose MTP step waits for the next token: positions len(tokens)-S .. len-1
    forced = None  # the token the main model already sampled at a rejected draft
    while len(res.tokens) < max_new:
        x = forced if forced is not None else sample(logits[0, -1], temperature, top_p, gen)
        tokens.append(x)
        res.tokens.append(x)
        if len(res.tokens) >= max_new or x in stop:
            break
        n = len(tokens) - 1  # position of x
        S = waiting.shape[1]
        nxt = torch.tensor([tokens[n - S + 1:n + 1]], device=device)
        draft = sample(model.draft_logits(waiting, nxt, cache)[0, -1], temperature, top_p, gen)
        h2, logits2 = model.decode(torch.tensor([[x, draft]], device=device), cache)
        res.main_passes += 1
        res.drafts += 1
        y = sample(logits2[0, 0], temperature, top_p, gen)  # the main model's own token after x
        if y == draft:
            res.accepted += 1
            tokens.append(draft)
            res.tokens.append(draft)
            if draft in stop:
                break
            waiting, logits, forced = h2, logits2[:, 1:], None
        else:  # drop the draft's cache entry; the main model's token is next
            cache.truncate(n + 1)
            waiting, forced = h2[:, :1], y
    res.tokens = res.tokens[:max_new]
    res.seconds = time.perf_counter() - t0
    return res
