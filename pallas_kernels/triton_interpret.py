"""Running our Triton kernels in Triton's interpreter on the CPU (the tests' path): numpy in, torch tensors
for the launch. Float32 throughout: the interpreter loses bf16 tensors (torch 2.13); the GPU tests cover
bf16 and fp8."""
from __future__ import annotations

import numpy as np


def interpreted(kernel):
  """The kernel, checked to be the interpreter's: TRITON_INTERPRET=1 must be set before triton is first
  imported (tests/conftest.py sets it)."""
  from triton.runtime.interpreter import InterpretedFunction
  if not isinstance(kernel, InterpretedFunction):
    raise RuntimeError("set TRITON_INTERPRET=1 before importing triton to run the kernel on the CPU")
  return kernel


def f32(x):
  import torch
  return torch.from_numpy(np.array(x, np.float32))


def i32(x):
  """Flat int32 (the kernels index with their own strides)."""
  import torch
  return torch.from_numpy(np.array(x, np.int32).reshape(-1))
