"""The ST-LINK model: rotary (SE-Attention tables), revin, memory (MRFFN), backbone, lora, forecaster."""
from stlink.model.forecaster import Forecaster, build_forecaster
from stlink.model.lora import merge_lora, trainable_parameters
from stlink.model.memory import kmeans, memory_patterns

__all__ = ["Forecaster", "build_forecaster", "kmeans", "memory_patterns", "merge_lora", "trainable_parameters"]
