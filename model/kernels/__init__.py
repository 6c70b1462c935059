"""Kernels, one family per folder: Triton (``attention``, ``moe``), imported only when a Triton backend is chosen,
and the C++ CPU kernels over packed quantized weights (``cpu``), built on first use."""
