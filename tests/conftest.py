"""Makes the helpers at the top of tests/ (random_dots1.py) importable from every test folder.

Triton kernels run on the CPU here through Triton's interpreter. It has to be on before anything imports Triton:
importing Transformers' Dots1 does, and Triton decides at each ``@triton.jit`` (its own ``tl.sum`` included) whether
that function is compiled or interpreted.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
