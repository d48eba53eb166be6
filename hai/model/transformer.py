"""The DeepSeek-V3 transformer: embedding -> L blocks (first k dense, rest MoE) -> norm -> head, plus MTP modules.

Single-device code with no collectives. The pieces are exposed separately (``embed``, ``layers``, ``head_loss``) so
the pipeline can cut the model into stages and keep the embedding, the output head and MTP on one rank (V3's
placement, so MTP shares them physically).

Batches are token tensors of shape (B, S + 1): inputs are tokens[:, :S], main targets tokens[:, 1:].
MTP depth k (1..D) combines the previous depth's hidden state at position i with the embedding of token i+k and
predicts token i+k+1 (DeepSeek-V3 sec. 2.2), so depth k sees S-k positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from hai.config import ModelConfig
from hai.model.attention import MLA, KVCache
from hai.model.init import materialize, param_dtype
from hai.model.layers import Linear, RMSNorm, SwiGLU, cross_entropy
from hai.model.moe import MoE, Router
from hai.model.recompute import RECOMPUTE_MODES, LinearOp, norm_linears, swiglu_down
from hai.model.regions import LOCAL, Region

__all__ = ["Block", "MTPModule", "Transformer", "LossOutput", "build_model"]


class LossOutput(NamedTuple):
    loss: torch.Tensor  # what backward() runs on: main + lambda * mean MTP loss (+ aux losses via injection)
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor


def _checkpointed(fn, *args):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def _op(m: Linear) -> LinearOp:
    return LinearOp(m.forward, m.backward, m.weight)


class Block(nn.Module):
    """x -> h1 = x + attn(norm(x)) -> h1 + ffn(norm(h1)). The pieces (``attention_part``, ``dense_part``,
    ``moe_front``; ``MoE.routed`` / ``expert_rows`` / ``finish``) are the seams the pipeline's overlapped F&B cuts
    the block at; ``forward`` runs them back to back."""

    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.precision == "fp8")
        self.fp8 = cfg.precision == "fp8"
        self.recompute = "none"  # none | v3 | full (hai.model.recompute)

    def segment(self, fn, *args):
        """Run one compute segment; ``recompute='full'`` recomputes it from its inputs in the backward."""
        if self.recompute == "full" and torch.is_grad_enabled():
            return _checkpointed(fn, *args)
        return fn(*args)

    def attention_part(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.recompute == "v3":
            return x_BSD + self.attn.forward_recompute(x_BSD, self.attn_norm)
        return x_BSD + self.attn(self.attn_norm(x_BSD))

    def dense_part(self, h_BSD: torch.Tensor) -> torch.Tensor:
        if self.recompute == "v3":
            f = self.ffn  # under TP the region is entered on the residual, so the norm (recomputed) sits inside it
            h1, h3 = norm_linears([f.tp.enter(h_BSD)], [self.ffn_norm], [_op(f.w1), _op(f.w3)])
            return h_BSD + f.tp.exit(swiglu_down(h1, h3, _op(f.w2), self.fp8))
        return h_BSD + self.ffn(self.ffn_norm(h_BSD))

    def moe_front(self, h_BSD: torch.Tensor):
        """(x_TD, route, aux, shared) of the MoE (``MoE.front`` with the ffn norm inside)."""
        return self.ffn.front(h_BSD, self.ffn_norm)

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:  # inference: latent KV cache, absorbed decode
            h = x_BSD + self.attn(self.attn_norm(x_BSD), cache, self.layer_id)
            return h + self.ffn(self.ffn_norm(h))
        h = self.segment(self.attention_part, x_BSD)
        if not isinstance(self.ffn, MoE):
            return self.segment(self.dense_part, h)
        x_TD, route, aux, shared = self.segment(self.moe_front, h)
        self.ffn.router.count(route)
        return h + self.ffn.finish(self.ffn.routed(x_TD, route), shared, aux).view_as(h)


class MTPModule(nn.Module):
    """One MTP depth: h' = Block(W [RMSNorm(h_prev); RMSNorm(emb(next token))]); shares embedding and head."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.embed_first = cfg.mtp_concat == "embed_first"
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, cfg.precision == "fp8")
        self.block = Block(cfg, cfg.num_layers + depth - 1, moe=cfg.is_moe)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.recompute = "none"

    def forward(self, h_prev_BSD: torch.Tensor, emb_BSD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``model.mtp_concat``: the projection's input is [hnorm(h); enorm(e)] (the paper's order) or [enorm(e);
        hnorm(h)] (the released checkpoints'). ``cache``: decoding (the block keeps its latents under its layer id)."""
        xs, norms = [h_prev_BSD, emb_BSD], [self.hnorm, self.enorm]
        if self.embed_first:
            xs, norms = xs[::-1], norms[::-1]
        if self.recompute == "v3" and cache is None:
            (x,) = norm_linears(xs, norms, [_op(self.proj)])
            return self.block(x)
        return self.block(self.proj(torch.cat([n(x) for n, x in zip(norms, xs)], dim=-1)), cache)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, moe=cfg.is_moe and i >= cfg.first_k_dense_replace) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size)  # never FP8 (V3 keeps the output head in bf16)
        self.mtp = nn.ModuleList(MTPModule(cfg, d + 1) for d in range(cfg.mtp_depth))
        self.recompute = "none"
        self.tp: Region = LOCAL  # hai.model.regions: under TP a vocabulary-split embedding and head

    def set_recompute(self, mode: str) -> "Transformer":
        """``train.recompute``: none | v3 | full (:mod:`hai.model.recompute`), on every module that honours it."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute={mode!r} is not one of {list(RECOMPUTE_MODES)}")
        for m in self.modules():
            if hasattr(m, "recompute"):
                m.recompute = mode
        return self

    # --- pieces (the pipeline stages call these) ---
    def embed_tokens(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """The embedding (vocabulary-parallel under TP; with SP this rank's sequence shard of it)."""
        return self.tp.embed(self.embed, tokens_BS)

    def logits(self, h_BSD: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        return self.head((norm or self.norm)(h_BSD)).float()

    def _loss(self, h_BSD: torch.Tensor, norm: nn.Module, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of head(norm(h)); under ``recompute='v3'`` the norm output is recomputed in the backward."""
        if self.recompute == "v3":  # under TP the region entered on the residual, the norm recomputed inside it
            (logits,) = norm_linears([self.tp.enter(h_BSD)], [norm], [_op(self.head)])
        else:
            logits = self.head(self.tp.enter(norm(h_BSD)))
        if self.tp.split:  # the head's vocabulary rows on this rank: a vocabulary-parallel cross-entropy
            return self.tp.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return cross_entropy(logits.flatten(0, 1), targets.flatten())

    def main_loss(self, h_BSD: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token loss of the last block's output."""
        return self._loss(h_BSD, self.norm, tokens[:, 1:])

    def mtp_loss(self, h_BSD: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean over MTP depths of their losses, from the last block's output (which re-uses embed and head)."""
        S = tokens.shape[1] - 1
        h = self.norm(h_BSD) if self.cfg.mtp_hidden == "post_norm" else h_BSD
        if self.tp.sp:
            return self._mtp_loss_sp(h, tokens)
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            h = module(h[:, : S - k], self.embed_tokens(tokens[:, k:S]))
            losses.append(self._loss(h, module.norm, tokens[:, k + 1:S + 1]))
        return torch.stack(losses).mean()

    def _mtp_loss_sp(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """MTP on sequence shards: depth k keeps all S positions (so every rank keeps its S/tp), the next-token
        inputs padded with k tokens at the end; causal attention leaves the first S-k positions exactly as the
        unpadded computation, the loss ignores the padding and the MoE neither counts it nor puts it in the
        balance loss (``MoE.valid_len``)."""
        S = tokens.shape[1] - 1
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            pad = tokens.new_zeros(tokens.shape[0], k)
            nxt = torch.cat([tokens[:, k:S], pad], dim=1)
            targets = torch.cat([tokens[:, k + 1:S + 1], pad - 1], dim=1)  # -1: padding
            if isinstance(module.block.ffn, MoE):  # stays set: a recomputed segment must see the same padding
                module.block.ffn.valid_len = S - k
            h = module(h, self.embed_tokens(nxt))
            losses.append(self._loss(h, module.norm, targets))
        return torch.stack(losses).mean()

    def head_loss(self, h_BSD: torch.Tensor, tokens: torch.Tensor) -> LossOutput:
        """Main next-token loss plus lambda x the MTP losses."""
        main = self.main_loss(h_BSD, tokens)
        mtp = self.mtp_loss(h_BSD, tokens) if self.mtp else main.new_zeros(())
        return LossOutput(main + self.cfg.mtp_lambda * mtp, main.detach(), mtp.detach())

    def forward(self, tokens: torch.Tensor) -> LossOutput:
        h = self.embed_tokens(tokens[:, :-1])
        for layer in self.layers:
            h = layer(h)
        return self.head_loss(h, tokens)

    # --- inference ---
    @torch.no_grad()
    def decode(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last block's output (B, S, D), logits) for tokens (B, S), continuing ``cache`` if given (latent-only KV
        cache, absorbed decode)."""
        h = self.embed(tokens_BS)
        for layer in self.layers:
            h = layer(h, cache)
        return h, self.logits(h)

    @torch.no_grad()
    def forward_logits(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits of the main model for tokens (B, S), continuing ``cache`` if given."""
        return self.decode(tokens_BS, cache)[1]

    @torch.no_grad()
    def draft_logits(self, h_BSD: torch.Tensor, next_tokens_BS: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """MTP depth 1 on the main model's states h_i (as ``decode`` returns them) and the tokens t_{i+1}: logits for
        t_{i+2} (the drafts of speculative decoding), continuing the MTP block's entry of ``cache``."""
        h = self.norm(h_BSD) if self.cfg.mtp_hidden == "post_norm" else h_BSD
        module = self.mtp[0]
        return self.logits(module(h, self.embed(next_tokens_BS), cache), module.norm)

    @torch.no_grad()
    def forward_logits_mtp(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main logits (B, S, V), per MTP depth k its logits (B, S-k, V)): depth k at position i has seen tokens
        up to i+k and predicts token i+k+1 (the drafts of speculative decoding)."""
        h = self.embed(tokens_BS)
        for layer in self.layers:
            h = layer(h)
        main, drafts = self.logits(h), []
        h = self.norm(h) if self.cfg.mtp_hidden == "post_norm" else h
        S = tokens_BS.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            h = module(h[:, : S - k], self.embed(tokens_BS[:, k:]))
            drafts.append(self.logits(h, module.norm))
        return main, drafts

    # --- balancing ---
    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_aux_grad_scale(self, scale: float) -> None:
        for moe in self.moe_layers():
            moe.aux_grad_scale = scale


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, recompute: str = "none") -> Transformer:
    """Build the whole model on ``meta`` and, unless ``device='meta'``, materialize it on ``device`` with weights in
    ``dtype`` (default: :func:`~hai.model.init.param_dtype`) initialized from ``seed`` (:mod:`hai.model.init`).

    A parallel run builds on ``meta``, applies its layout (the parallel layer's ``parallelize``) and materializes only then."""
    if cfg.precision == "fp8" and str(device) != "meta":
        import hai.kernels as k

        if not hasattr(k, "fp8_linear"):
            raise ValueError("model.precision=fp8 needs hai.kernels.fp8_linear, which this build lacks: "
                             "use model.precision=bf16 or fp32")
    with torch.device("meta"):
        model = Transformer(cfg).set_recompute(recompute)
    if str(device) != "meta":
        materialize(model, device, dtype or param_dtype(cfg), seed, cfg.init_std)
    return model
