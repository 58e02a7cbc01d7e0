"""Rollout: the `RolloutEngine` protocol, its request and result types, and the native engine."""

from miles_stream.engines.base import GenerationRequest, GenerationResult, RolloutEngine, SamplingParams

__all__ = ["GenerationRequest", "GenerationResult", "RolloutEngine", "SamplingParams"]
