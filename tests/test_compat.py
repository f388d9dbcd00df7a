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


def test_the_gpu_clients_pinned_host_memory_follows_the_host_tier(monkeypatch):
  """JAX's GPU client pins at most XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB (64 GB unset, 16 GB preallocated) for host
  memory arrays: a host tier gets its room pinned when the client starts, a user's own setting is kept, and a tier
  that cannot fit is refused at start."""
  import pytest
  var, pre = compat.PINNED_HOST_LIMIT_VAR, compat.PINNED_HOST_PREALLOCATE_VAR
  monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv(pre, raising=False)
  monkeypatch.setattr(compat, "backends_started", lambda: True)
  compat.configure_host_memory(32, gpus=1, memory_gb=2000)   # too late: the client has its pool
  assert var not in compat.os.environ and pre not in compat.os.environ
  monkeypatch.setattr(compat, "backends_started", lambda: False)
  compat.configure_host_memory(0, gpus=1, memory_gb=2000)   # no tier: XLA's defaults
  assert var not in compat.os.environ and pre not in compat.os.environ
  compat.check_pinned_host_fits("gpu", 32)             # the 64 GB default less the headroom
  with pytest.raises(ValueError, match=f"host_kv_cache_gb=100 .*56 GB.*{var}"):
    compat.check_pinned_host_fits("gpu", 100)
  compat.check_pinned_host_fits("cpu", 100)            # the CPU's host memory has no such pool
  assert not compat.configure_host_memory(31.5, gpus=2, memory_gb=140)   # 3 pools of 40 GB > 80% of 140 GB
  assert pre not in compat.os.environ and var not in compat.os.environ    # (the default 64 GB holds the tier)
  assert not compat.configure_host_memory(60, gpus=0, memory_gb=1000)     # no GPU: nothing to preallocate ...
  assert compat.os.environ[var] == "68" and pre not in compat.os.environ  # ... the limit alone where it is short
  monkeypatch.delenv(var)
  assert compat.configure_host_memory(31.5, gpus=1, memory_gb=128)        # one GPU: 2 x 40 GB of 128
  assert compat.os.environ[var] == "40" and compat.os.environ[pre] == "true"
  compat.check_pinned_host_fits("gpu", 31.5)
  with pytest.raises(ValueError, match="32 GB"):
    compat.check_pinned_host_fits("gpu", 33)
  monkeypatch.setenv(var, "100")                       # a user's own setting wins, and is checked
  monkeypatch.delenv(pre)
  compat.configure_host_memory(200, gpus=1, memory_gb=2000)
  assert compat.os.environ[var] == "100" and pre not in compat.os.environ
  with pytest.raises(ValueError, match="92 GB"):
    compat.check_pinned_host_fits("gpu", 93)
  monkeypatch.delenv(var)
  monkeypatch.setenv(pre, "1")                         # preallocated at XLA's default size: 16 GB
  compat.configure_host_memory(32, gpus=1, memory_gb=2000)
  assert var not in compat.os.environ
  with pytest.raises(ValueError, match="8 GB"):
    compat.check_pinned_host_fits("gpu", 9)


def test_gpu_count_before_backend_reads_nvidia_smi_and_visible_devices(tmp_path, monkeypatch):
  import sys
  smi = tmp_path / "nvidia-smi"
  smi.write_text(f"#!{sys.executable}\nfor i in range(4): print(f'GPU {{i}}: NVIDIA H200 (UUID: GPU-{{i}})')\n")
  smi.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}:{compat.os.environ['PATH']}")
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert compat.gpu_count_before_backend() == 4
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
  assert compat.gpu_count_before_backend() == 2
  monkeypatch.setenv("PATH", str(tmp_path / "none"))
  assert compat.gpu_count_before_backend() == 0


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
