"""Inference: ``hai generate`` over a latent KV cache with absorbed decode and MTP drafts."""
