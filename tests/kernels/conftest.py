"""Triton kernels run on the CPU here through Triton's interpreter; it must be on before any kernel is defined."""
import os

os.environ["TRITON_INTERPRET"] = "1"
