"""HAI: distributed training for DeepSeek-V3-architecture mixture-of-experts models."""

__version__ = "0.1.0"
