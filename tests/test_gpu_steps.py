"""lab/gpu_steps.sh on the CPU with its `env` step: the summary table, and XLA's autotuning results carried from
one device call to the next (unpacked from $AUTOTUNE_IN into JAX's cache before the steps, packed into
$OUT/xla_autotune.tgz after them, beside the summary)."""
import os
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_call_carries_the_autotune_results_in_and_out(tmp_path):
  src = tmp_path / "earlier"
  src.mkdir()
  (src / "fusion_1.textproto").write_text("result from an earlier call\n")
  carried = tmp_path / "xla_autotune.tgz"
  with tarfile.open(carried, "w:gz") as t:
    t.add(src / "fusion_1.textproto", arcname="fusion_1.textproto")
  out = tmp_path / "out"
  env = {**os.environ, "HOME": str(tmp_path / "home"), "OUT": str(out), "AUTOTUNE_IN": str(carried),
         "JAX_PLATFORMS": "cpu", "PY": "python"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  r = subprocess.run(["bash", "lab/gpu_steps.sh", "env:120"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "autotune cache: 1 results carried in" in r.stdout
  assert sorted(os.listdir(out)) == ["results.tgz", "summary.md", "xla_autotune.tgz"]
  assert "| env | 0 |" in (out / "summary.md").read_text()
  with tarfile.open(out / "xla_autotune.tgz") as t:
    assert "./fusion_1.textproto" in t.getnames()
  cache = tmp_path / "home/.cache/nanoflow_jax/jax_cache/xla_gpu_per_fusion_autotune_cache_dir/fusion_1.textproto"
  assert cache.read_text() == "result from an earlier call\n"
