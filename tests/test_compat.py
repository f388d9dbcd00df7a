"""The XLA flags the engine sets for nanoflow mode before the GPU backend starts."""
from nanoflow_jax import compat


def test_concurrent_command_buffer_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  compat.enable_concurrent_command_buffers()
  compat.enable_concurrent_command_buffers()          # a second call adds nothing
  flags = compat.os.environ["XLA_FLAGS"].split()
  assert flags[0] == "--xla_dump_to=/tmp/x"
  assert flags.count("--xla_gpu_command_buffer_scheduling_mode=CONCURRENT") == 1
  assert flags.count(compat.NO_LATENCY_HIDING_FLAG) == 1
  # Under tensor parallelism the latency-hiding scheduler overlaps the all-reduces: left alone.
  monkeypatch.setenv("XLA_FLAGS", "")
  compat.enable_concurrent_command_buffers(tensor_parallel=4)
  assert "latency_hiding" not in compat.os.environ["XLA_FLAGS"]
  assert "CONCURRENT" in compat.os.environ["XLA_FLAGS"]
  # A user's own setting wins.
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
  compat.enable_concurrent_command_buffers()
  assert "=false" not in compat.os.environ["XLA_FLAGS"]


def test_gpu_name_before_backend_reads_nvidia_smi(tmp_path, monkeypatch):
  import sys
  smi = tmp_path / "nvidia-smi"
  smi.write_text(f"#!{sys.executable}\nprint('NVIDIA H200')\nprint('NVIDIA H200')\n")
  smi.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}{compat.os.pathsep}{compat.os.environ['PATH']}")
  assert compat.gpu_name_before_backend() == "NVIDIA H200"   # the first GPU's
  smi.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(9)\n")
  assert compat.gpu_name_before_backend() is None             # nvidia-smi there, no GPU
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  assert compat.gpu_name_before_backend() is None             # no nvidia-smi


def test_compile_with_options_drops_only_options_this_xla_lacks(caplog):
  """A speed-only compile option this XLA does not know is dropped with a warning, a known one is kept; any
  other compile error still raises."""
  import jax
  import jax.numpy as jnp
  import pytest
  low = jax.jit(lambda x: x * 2).lower(jnp.ones(3))
  assert compat.compile_with_options(low, {"xla_gpu_autotune_level": 0})(jnp.ones(3)).tolist() == [2, 2, 2]
  assert not caplog.records
  assert compat.compile_with_options(low, {"xla_no_such_option_zz": 1})(jnp.ones(3)).tolist() == [2, 2, 2]
  assert "xla_no_such_option_zz" in caplog.text

  class Failing:
    def compile(self, options=None):
      raise RuntimeError("out of memory")
  with pytest.raises(RuntimeError, match="out of memory"):
    compat.compile_with_options(Failing(), {"xla_gpu_autotune_level": 0})
