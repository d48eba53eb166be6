"""The DeepSeek-V3 transformer: embedding -> L blocks (first k dense, rest MoE) -> norm -> head, plus MTP modules.

Single-device code with no collectives. The pieces are exposed separately (``embed``, ``layers``, ``head_loss``) so
the pipeline can cut the model into stages and keep the embedding, the output head and MTP on one rank (V3's
placement, so MTP shares them physically).

Batches are token tensors of shape (B, S + 1): inputs are tokens[:, :S], main targets tokens[:, 1:]. Chat (SFT)
windows carry per-token flags above the ids (:mod:`hai.model.batch`): non-targets are ignored by the main and MTP
losses, and a target counts only inside the document of the position predicting it. With ``target_norm`` set (the
trainer sets it every step for chat data) a micro-batch's loss is the sum over its targets divided by the global
batch's target count per micro-batch, so the step's losses add up to the per-token mean over the global batch.
MTP depth k (1..D) combines the previous depth's hidden state at position i with the embedding of token i+k and
predicts token i+k+1 (DeepSeek-V3 sec. 2.2), so depth k sees S-k positions.

The sequence seam (``self.cp``, :mod:`hai.model.sequence`): under context parallelism the model is handed the whole
window of tokens and keeps this rank's positions (the embedding's input, the targets); each rank's losses are its
positions' share of the window's mean (sum over its positions / the window's count), so the sum over the CP ranks
is the single-process loss and the gradients summed over them (ZeRO-1 over dp x cp) are its gradients. With
``doc_spec`` set (``data.document_mask`` / ``data.reset_positions``) every forward derives the window's documents
from its tokens and hands them to the attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from hai.config import ModelConfig
from hai.model.attention import MLA, KVCache
from hai.model.batch import doc_starts, target_ids, token_ids
from hai.model.init import materialize, param_dtype
from hai.model.layers import Linear, RMSNorm, SwiGLU, cross_entropy
from hai.model.moe import MoE, Router
from hai.model.recompute import RECOMPUTE_MODES, LinearOp, norm_linears, swiglu_down
from hai.model.regions import LOCAL, Region
from hai.model.sequence import LOCAL_SEQ, Documents, DocumentSpec, SequenceSplit, documents

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

    def attention_part(self, x_BSD: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        if self.recompute == "v3":
            return x_BSD + self.attn.forward_recompute(x_BSD, self.attn_norm, docs)
        return x_BSD + self.attn(self.attn_norm(x_BSD), docs=docs)

    def dense_part(self, h_BSD: torch.Tensor) -> torch.Tensor:
        if self.recompute == "v3":
            f = self.ffn  # under TP the region is entered on the residual, so the norm (recomputed) sits inside it
            h1, h3 = norm_linears([f.tp.enter(h_BSD)], [self.ffn_norm], [_op(f.w1), _op(f.w3)])
            return h_BSD + f.tp.exit(swiglu_down(h1, h3, _op(f.w2), self.fp8))
        return h_BSD + self.ffn(self.ffn_norm(h_BSD))

    def moe_front(self, h_BSD: torch.Tensor):
        """(x_TD, route, aux, shared) of the MoE (``MoE.front`` with the ffn norm inside)."""
        return self.ffn.front(h_BSD, self.ffn_norm)

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None, docs: Documents | None = None) -> torch.Tensor:
        if cache is not None:  # inference: latent KV cache, absorbed decode
            h = x_BSD + self.attn(self.attn_norm(x_BSD), cache, self.layer_id)
            return h + self.ffn(self.ffn_norm(h))
        h = self.segment(self.attention_part, x_BSD, docs)
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

    def forward(self, h_prev_BSD: torch.Tensor, emb_BSD: torch.Tensor, cache: KVCache | None = None,
                docs: Documents | None = None) -> torch.Tensor:
        """``model.mtp_concat``: the projection's input is [hnorm(h); enorm(e)] (the paper's order) or [enorm(e);
        hnorm(h)] (the released checkpoints'). ``cache``: decoding (the block keeps its latents under its layer id).
        ``docs``: the documents of the positions the block attends over (those of h)."""
        xs, norms = [h_prev_BSD, emb_BSD], [self.hnorm, self.enorm]
        if self.embed_first:
            xs, norms = xs[::-1], norms[::-1]
        if self.recompute == "v3" and cache is None:
            (x,) = norm_linears(xs, norms, [_op(self.proj)])
            return self.block(x, docs=docs)
        return self.block(self.proj(torch.cat([n(x) for n, x in zip(norms, xs)], dim=-1)), cache, docs)


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
        self.cp: SequenceSplit = LOCAL_SEQ  # hai.model.sequence: under CP this rank's positions of the window
        self.doc_spec: DocumentSpec | None = None  # data.document_mask / data.reset_positions (set by the trainer)
        self.target_norm: torch.Tensor | None = None  # SFT: (1 + mtp_depth,) targets per micro-batch of the step

    def set_recompute(self, mode: str) -> "Transformer":
        """``train.recompute``: none | v3 | full (:mod:`hai.model.recompute`), on every module that honours it."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute={mode!r} is not one of {list(RECOMPUTE_MODES)}")
        for m in self.modules():
            if hasattr(m, "recompute"):
                m.recompute = mode
        return self

    # --- pieces (the pipeline stages call these) ---
    def documents(self, tokens: torch.Tensor) -> Documents | None:
        """The documents of a batch of windows (B, S+1) (None without ``doc_spec``): the stages call it once per
        micro-batch and hand the result to every block."""
        inputs = tokens[:, :-1]
        marked = self.doc_spec is not None and self.doc_spec.marked  # chat windows flag their conversations
        return documents(token_ids(inputs), self.doc_spec, doc_starts(inputs) if marked else None)

    def embed_tokens(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """The embedding of whole-window tokens (B, S): this rank's positions under CP (vocabulary-parallel under
        TP; with SP this rank's sequence shard of them)."""
        return self.tp.embed(self.embed, self.cp.take(token_ids(tokens_BS)))

    def logits(self, h_BSD: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        return self.head((norm or self.norm)(h_BSD)).float()

    def _loss(self, h_BSD: torch.Tensor, norm: nn.Module, targets: torch.Tensor,
              count: int | None = None, depth: int = 0) -> torch.Tensor:
        """Cross-entropy of head(norm(h)); under ``recompute='v3'`` the norm output is recomputed in the backward.
        Under CP the mean over this rank's targets times their share of the window's ``count`` targets. With
        ``target_norm`` (SFT): the sum over this rank's targets / ``target_norm[depth]`` (0: main, k: MTP depth k)."""
        if self.recompute == "v3":  # under TP the region entered on the residual, the norm recomputed inside it
            (logits,) = norm_linears([self.tp.enter(h_BSD)], [norm], [_op(self.head)])
        else:
            logits = self.head(self.tp.enter(norm(h_BSD)))
        if self.tp.split:  # the head's vocabulary rows on this rank: a vocabulary-parallel cross-entropy
            loss = self.tp.cross_entropy(logits.flatten(0, 1), targets.flatten())
        else:
            loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.target_norm is not None:  # the mean times this micro-batch's count: its sum, over the step's norm
            return loss * (targets >= 0).sum() / self.target_norm[depth]
        if not self.cp.split:
            return loss
        if count is None:  # no padding: every rank holds 1/cp of the window's targets
            return loss / self.cp.size
        return loss * (targets >= 0).sum() / count

    def main_loss(self, h_BSD: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token loss of the last block's output (this rank's share of it under CP)."""
        return self._loss(h_BSD, self.norm, self.cp.take(target_ids(tokens)))

    def mtp_loss(self, h_BSD: torch.Tensor, tokens: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """Mean over MTP depths of their losses, from the last block's output (which re-uses embed and head).
        ``docs``: the window's documents (derived from ``tokens`` when not given)."""
        S = tokens.shape[1] - 1
        docs = self.documents(tokens) if docs is None else docs
        h = self.norm(h_BSD) if self.cfg.mtp_hidden == "post_norm" else h_BSD
        if self.tp.sp or self.cp.split:
            return self._mtp_loss_padded(h, tokens, docs)
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            h = module(h[:, : S - k], self.embed_tokens(tokens[:, k:S]), docs=None if docs is None else
                       docs.prefix(S - k))
            losses.append(self._loss(h, module.norm, target_ids(tokens, k), depth=k))
        return torch.stack(losses).mean()

    def _mtp_loss_padded(self, h: torch.Tensor, tokens: torch.Tensor, docs: Documents | None) -> torch.Tensor:
        """MTP on sequence shards (SP) or CP chunks: depth k keeps all S positions (so every rank keeps its
        positions), the next-token inputs padded with k tokens at the end of the window; causal attention leaves the
        first S-k positions exactly as the unpadded computation, the loss ignores the padding and the MoE neither
        counts it nor puts it in the balance loss (``MoE.valid_len``, a global position)."""
        S = tokens.shape[1] - 1
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            pad = tokens.new_zeros(tokens.shape[0], k)
            nxt = torch.cat([tokens[:, k:S], pad], dim=1)
            targets = self.cp.take(torch.cat([target_ids(tokens, k), pad - 1], dim=1))  # -1: padding
            if isinstance(module.block.ffn, MoE):  # stays set: a recomputed segment must see the same padding
                module.block.ffn.valid_len = S - k
            h = module(h, self.embed_tokens(nxt), docs=docs)
            losses.append(self._loss(h, module.norm, targets, tokens.shape[0] * (S - k), depth=k))
        return torch.stack(losses).mean()

    def head_loss(self, h_BSD: torch.Tensor, tokens: torch.Tensor, docs: Documents | None = None) -> LossOutput:
        """Main next-token loss plus lambda x the MTP losses."""
        main = self.main_loss(h_BSD, tokens)
        mtp = self.mtp_loss(h_BSD, tokens, docs) if self.mtp else main.new_zeros(())
        return LossOutput(main + self.cfg.mtp_lambda * mtp, main.detach(), mtp.detach())

    def forward(self, tokens: torch.Tensor) -> LossOutput:
        docs = self.documents(tokens)
        h = self.embed_tokens(tokens[:, :-1])
        for layer in self.layers:
            h = layer(h, docs=docs)
        return self.head_loss(h, tokens, docs)

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
        up to i+k and predicts token i+k+1 (the drafts of speculative decoding). Documents as ``doc_spec`` says."""
        S = tokens_BS.shape[1]
        docs = documents(tokens_BS, self.doc_spec)
        h = self.embed(tokens_BS)
        for layer in self.layers:
            h = layer(h, docs=docs)
        main, drafts = self.logits(h), []
        h = self.norm(h) if self.cfg.mtp_hidden == "post_norm" else h
        for k, module in enumerate(self.mtp, start=1):
            h = module(h[:, : S - k], self.embed(tokens_BS[:, k:]), docs=None if docs is None else docs.prefix(S - k))
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

    A parallel run builds on ``meta``, applies its layout (the parallel layer's ``parallelize``) and materializes
    only then."""
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
