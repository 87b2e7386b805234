"""Gated Flax NNX models, one implementation per architecture family."""

from flax import nnx

from jaxtrace.models.base import GatedLM, functional
from jaxtrace.models.config import FAMILIES, ModelConfig, UnsupportedModelError
from jaxtrace.models.gpt2 import GPT2
from jaxtrace.models.llama import Llama
from jaxtrace.models.sites import MODEL_SITES, SITES, full_gates, gate_shape

MODEL_CLASSES: dict[str, type[GatedLM]] = {"gpt2": GPT2, "llama": Llama}


def init_model(config: ModelConfig, seed: int = 0) -> GatedLM:
    """A randomly initialised model (normal(0, 0.02) weights, unit norms) of the given config."""
    return MODEL_CLASSES[config.family](config, rngs=nnx.Rngs(seed))


__all__ = ["FAMILIES", "GPT2", "GatedLM", "Llama", "MODEL_CLASSES", "MODEL_SITES", "ModelConfig", "SITES",
           "UnsupportedModelError", "full_gates", "functional", "gate_shape", "init_model"]
