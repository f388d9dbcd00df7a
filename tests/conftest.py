import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not os.environ.get("NANOFLOW_GPU_TESTS"):  # tests/gpu run with NANOFLOW_GPU_TESTS=1
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Triton kernels run in Triton's interpreter on the CPU; it must be chosen before triton is imported.
  os.environ.setdefault("TRITON_INTERPRET", "1")
