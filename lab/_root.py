"""The lab tools' shared preamble: run as `python lab/<tool>.py`, a tool imports this first so that the
repository root (nanoflow_jax, pallas_kernels, launch) is importable."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
