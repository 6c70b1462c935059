"""Makes the helpers at the top of tests/ (random_dots1.py) importable from every test folder.

Without CUDA, Triton kernels run only interpreted, and triton.language settles that when it is first imported
(Transformers imports it), so the switch is set here, before any test module loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
