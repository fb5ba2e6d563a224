"""The real models by short name (for the CLIs' --model NAME), each prepared into the cache on first use."""
from pathlib import Path

from scripts import prepare_qwen2_5_coder, prepare_smollm2

MODELS = {"smollm2-135m": prepare_smollm2, "qwen2.5-coder-0.5b": prepare_qwen2_5_coder}


def prepare(name: str) -> Path:
    """The checkpoint directory of MODELS[name], downloaded and converted if it is not there yet."""
    return MODELS[name].prepare()
