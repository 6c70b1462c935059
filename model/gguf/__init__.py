"""GGUF files (llama.cpp's format) as a checkpoint: reader, metadata as a ModelConfig, blocks, tensor placement,
loader, tokenizer."""
