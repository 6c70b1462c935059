"""Quantized weights on the CPU: the packed integer format (``packed``) that GGUF blocks and int8/int4 checkpoints
are converted into, and that the kernels in ``model.kernels.cpu`` multiply."""
