"""A dots1 GGUF file's hyperparameters (``dots1.*`` metadata, tensor shapes) as the engine's ModelConfig."""
from model.config import ModelConfig
from model.gguf.reader import GGUFMetadata


def config_from_gguf(metadata: GGUFMetadata) -> ModelConfig:
    """The Dots1 architecture of ``metadata`` in config.json's terms, validated like a config.json."""
    return ModelConfig.from_gguf_metadata(metadata)
