"""Triton kernels, one family per folder; imported only when a Triton backend is chosen."""
