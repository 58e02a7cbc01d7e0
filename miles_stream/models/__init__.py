"""Model helpers: tiny checkpoints built locally for tests and the demo."""

from miles_stream.models.tiny import TinyModelConfig, build_tiny_model, build_tokenizer

__all__ = ["TinyModelConfig", "build_tiny_model", "build_tokenizer"]
