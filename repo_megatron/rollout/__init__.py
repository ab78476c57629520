"""The rollout side: engine interface, embedded CPU engine, and the RePO stage (no Megatron)."""

from .engine import GenerationResult, RolloutEngine, SamplingParams
from .stage import RolloutStage, sampling_params
from .types import Group, Prompt, RolloutBatch, Sample

__all__ = ["GenerationResult", "Group", "Prompt", "RolloutBatch", "RolloutEngine",
           "RolloutStage", "Sample", "SamplingParams", "sampling_params"]
