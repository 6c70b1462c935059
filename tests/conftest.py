"""Makes the helpers at the top of tests/ (random_dots1.py) importable from every test folder.

Without CUDA, Triton kernels run on the CPU through Triton's interpreter. It has to be on before anything imports
Triton: importing Transformers' Dots1 does, and Triton decides at each ``@triton.jit`` (its own ``tl.sum`` included)
whether that function is compiled or interpreted.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
