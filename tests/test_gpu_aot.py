"""lab/gpu_aot.py's census of XLA's thunk-sequence dump: what the host launches one by one, what command buffers
take, a layer loop's body once a layer. The dump below has the form XLA (jaxlib 0.10.2's CUDA plugin) writes for
the engine's steps; the compile itself needs the plugin and runs outside CI (docs/history/perf-notes.md)."""
import os

from lab import gpu_aot

# Two command buffers around two loose custom calls, a loop whose body holds a weight slice's copy (under a
# dynamic-slice fusion), a kernel and a command buffer of its own, and one loose kernel after it.
DUMP = """\
000: kCommandBuffer [source       | next=010 (1)] 
    001: kCustomKernel [source       | next=002 (1)] loop_cosine_sine_fusion grid: [8, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
    002: kCustomKernel [prev=001 (1) | next=003 (1)] input_scatter_fusion_66 grid: [128, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
    003: kCustomKernel [prev=002 (1) | sink        ] input_scatter_fusion_65 grid: [128, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
010: kCustomCall    [prev=000 (1) | next=011 (1)] kCustomCall
011: kCustomCall    [prev=010 (1) | next=000 (1)] kCustomCall
000: kCommandBuffer [prev=011 (1) | next=004 (1)] 
    012: kCustomKernel [source       | next=013 (1)] input_reduce_fusion_31 grid: [16, 1, 1] threads: [256, 1, 1]  shared_memory: 0 bytes
    013: kCustomKernel [prev=012 (1) | sink        ] gemm_fusion_dot_1 grid: [4096, 1, 1] threads: [64, 1, 1]  shared_memory: 512 bytes
004: kWhile         [prev=000 (1) | next=020 (1)]   
condition:
    005: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
  body:
    006: kDynamicSliceFusion [source       | next=008 (1)] params=1, results=1
        007: kCopy [source | sink] kCopy
    008: kCustomKernel       [prev=006 (1) | next=000 (1)] fusion_94 grid: [128, 1, 1] threads: [128, 1, 1]  shared_memory: 16 bytes
    000: kCommandBuffer      [prev=008 (1) | sink] 
        015: kCustomKernel [source       | next=016 (1)] loop_add_fusion grid: [1024, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
        016: kCustomKernel [prev=015 (1) | sink        ] loop_add_fusion_2 grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
020: kCustomKernel [prev=004 (1) | sink        ] loop_gather_fusion grid: [256, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
"""


def test_census_of_a_step_with_command_buffers_loose_calls_and_a_loop():
  c = gpu_aot.census(DUMP)
  # host: 2 command buffers + 2 custom calls + (condition 1 + slice copy 1 + kernel 1 + command buffer 1) + 1
  assert c.launches == 2 + 2 + 4 + 1
  assert c.command_buffers == 3 and c.loops == 1
  assert c.kernels == 3 + 2 + 2 + 1 + 1 + 1 + 2 + 1
  assert c.in_graphs == 3 + 2 + 2
  assert c.kernels - c.in_graphs == sum(c.loose.values())
  assert c.loose == {"kCustomCall": 2, "loop_compare_fusion": 1, "copy": 1, "fusion": 1, "loop_gather_fusion": 1}
  assert c.by_name["input_scatter_fusion"] == 2 and c.by_name["loop_add_fusion"] == 2


def test_a_loop_body_counts_once_per_trip():
  once, layers = gpu_aot.census(DUMP), gpu_aot.census(DUMP, loop_trips=32)
  body_launches = 4   # condition, slice copy, kernel, command buffer
  assert layers.launches == once.launches + 31 * body_launches
  assert layers.command_buffers == 2 + 32 and layers.loops == 1
  assert layers.in_graphs == 3 + 2 + 32 * 2
  assert layers.by_name["copy"] == 32


def test_kernel_names_lose_xla_numbering_only():
  assert gpu_aot.kernel_name("gemm_fusion_dot_418") == "gemm_fusion_dot"
  assert gpu_aot.kernel_name("loop_add_fusion.12") == "loop_add_fusion"
  assert gpu_aot.kernel_name("paged_attention__1") == "paged_attention_"
  assert gpu_aot.kernel_name("wrapped_transpose") == "wrapped_transpose"


def test_the_dump_after_thunk_passes_is_taken_where_xla_wrote_one(tmp_path):
  for name in ("module_0001.jit__forward_step.thunk_sequence.txt",
               "module_0001.jit__forward_step.thunk_sequence_after_thunk_passes.txt",
               "module_0002.jit__sample_step.thunk_sequence.txt"):
    (tmp_path / name).write_text("")
  assert [os.path.basename(p) for p in gpu_aot.thunk_dumps(str(tmp_path))] == [
      "module_0001.jit__forward_step.thunk_sequence_after_thunk_passes.txt",
      "module_0002.jit__sample_step.thunk_sequence.txt"]


def test_the_table_row_says_what_runs_alone():
  row = gpu_aot.table_row("x", gpu_aot.census(DUMP), 2.0)
  assert row == "| x | 9 | 3 | 1 | 13 | 7 | 6 | 2 |"
