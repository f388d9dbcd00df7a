"""lab/triton_ir.py compiles the decode kernel for sm_90 on the CPU: swap_ab puts both dots on Hopper's
wgmma, the engine's configuration keeps mma.sync, and both pipeline the K/V loads as asynchronous copies
(what the GPU figures in docs/history/perf-notes.md rest on). In a subprocess: the tests' own process imported
Triton as the interpreter (conftest.py), which does not compile."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_what_each_decode_variant_compiles_to():
  env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "triton_ir.py"), "--variant=swap_ab=1",
                        "--variant=prefetch_pages=1,num_stages=3", "--variant=key_groups=4,num_stages=3", "--ptx"],
                       capture_output=True, text=True, env=env, timeout=300, check=True).stdout
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
  header, counts = rows[0], {r[0]: dict(zip(rows[0][1:], map(int, r[1:]))) for r in rows[1:]}
  assert header[1:3] == ["wgmma", "mma.sync dot"]
  base, swap = counts["engine config"], counts["swap_ab=1"]
  assert base["wgmma"] == 0 and base["mma.sync dot"] > 0
  assert swap["wgmma"] > 0 and swap["mma.sync dot"] == 0
  assert base["async copy"] > 0 and swap["async copy"] > 0
  # Page ids loaded in the same iteration as the K/V tiles they address: Triton 3.9 does not pipeline
  # those loads into a dot (every wait drains all copies). Loaded one iteration ahead, with 3 stages, the
  # tiles are double-buffered and two copy groups stay in flight.
  ahead = counts["prefetch_pages=1,num_stages=3"]
  assert base["copies in flight"] == 0 and base["tile buffers"] == 1
  assert ahead["copies in flight"] >= 2 and ahead["tile buffers"] >= 2
  # Key groups (a softmax state per warp) keep the pipeline and drop the per-block cross-warp barriers.
  groups = counts["key_groups=4,num_stages=3"]
  assert groups["copies in flight"] >= 2 and 0 < groups["loop bar"] < ahead["loop bar"]


def test_inner_loop_counts_the_shortest_backward_branch():
  from lab.triton_ir import inner_loop
  ptx = """
  mov.u32 %r1, 0;
$L__BB0_1:
  add.s32 %r1, %r1, 1;
$L__BB0_2:
  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r2}, {%r3}, {%f1};
  cp.async.cg.shared.global [%r4], [%rd1], 16;
  bar.sync 0;
  @%p1 bra $L__BB0_2;
  @!%p2 bra.uni $L__BB0_1;
  ret;
"""
  assert inner_loop(ptx) == {"loop instr": 4, "loop mma": 1, "loop cp.async": 1, "loop bar": 1}
  assert inner_loop("ret;")["loop instr"] == 0


DYNAMIC_PTX = """
import re
from lab.triton_ir import attention_ttgir
from pallas_kernels import paged_attention_triton as pat
dyn = attention_ttgir({**pat.PREFILL_CONFIG_FP8, "dynamic_work": True}, "fp8e4nv", stage="ptx")
fixed = attention_ttgir(dict(pat.PREFILL_CONFIG_FP8), "fp8e4nv", stage="ptx")
print("DYN", len(re.findall(r"atom[.]global[.a-z0-9_]*[.]add", dyn)), "FIXED", len(re.findall(r"\\batom[.]", fixed)))
"""


def test_dynamic_work_compiles_for_sm90_with_an_atomic_counter():
  """The attention's dynamic_work takes its work units with an atomic add (the fixed share has none)."""
  env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
  out = subprocess.run([sys.executable, "-c", DYNAMIC_PTX], capture_output=True, text=True, env=env, timeout=300,
                       cwd=ROOT, check=True).stdout.split()
  assert int(out[out.index("DYN") + 1]) >= 1 and int(out[out.index("FIXED") + 1]) == 0
