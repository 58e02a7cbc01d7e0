"""miles-stream: asynchronous RL post-training for LLMs over Redis Streams."""

from miles_stream.errors import (
    ConfigError,
    MilesStreamError,
    RetriableError,
    SchemaError,
)

__all__ = ["ConfigError", "MilesStreamError", "RetriableError", "SchemaError"]
__version__ = "0.1.0"
