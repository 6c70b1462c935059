"""Triton kernels of the fused mixture-of-experts path (``fused_moe``), one kernel per file."""
