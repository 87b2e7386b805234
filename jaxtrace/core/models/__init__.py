"""Gated Flax NNX models, one implementation per architecture family."""

from flax import nnx

from jaxtrace.core.models.base import GatedLM, PureLM, pure
from jaxtrace.core.models.config import FAMILIES, ModelConfig, UnsupportedModelError
from jaxtrace.core.models.gemma import Gemma
from jaxtrace.core.models.gpt2 import GPT2
from jaxtrace.core.models.llama import Llama

MODEL_CLASSES: dict[str, type[GatedLM]] = {"gpt2": GPT2, "llama": Llama, "gemma": Gemma}


def init_model(config: ModelConfig, seed: int = 0) -> GatedLM:
    """A randomly initialised model (normal(0, 0.02) weights, unit-scale norms) of the given config."""
    return MODEL_CLASSES[config.family](config, rngs=nnx.Rngs(seed))


__all__ = ["FAMILIES", "GPT2", "Gemma", "GatedLM", "Llama", "MODEL_CLASSES", "ModelConfig", "UnsupportedModelError",
           "PureLM", "init_model", "pure"]
