"""Shared pytest setup.

Without a CUDA device, Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must be
set before any kernel module imports Triton, so it is set here, at collection time.  With a GPU the
environment is left alone.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# make ``import tests.tolerances`` work however pytest was started
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
