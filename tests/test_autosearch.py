"""Stage 2 of the auto-search (MILP) on a synthetic profile, and the CLI's --from_profile path."""
import os
import subprocess
import sys

import pytest

from nanoflow_jax.runtime import autosearch
from nanoflow_jax.runtime.plan import AG_OPS, NETWORK_SMS, RESOURCE, TP_OPS, PipelineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARES = [132, 99, 66, 33]


def synthetic_profile() -> autosearch.Profile:
  """GEMMs scale with SMs; attention saturates memory bandwidth at a third of the SMs: overlap pays."""
  sizes = [256, 512, 1024, 2048]
  gemm = lambda m, s, w: w * m / 1000 * 132 / s
  attn = lambda m, s, w: w * m / 1000 * max(1.0, 44 / s)
  t = {op: {str(s): [[m, gemm(m, s, w)] for m in sizes] for s in SHARES}
       for op, w in (("qkv", 0.15), ("o", 0.1), ("gate_up", 0.7), ("down", 0.35))}
  t["rope_append"] = {str(s): [[m, 0.01 * m / 1000] for m in sizes] for s in SHARES}
  t["decode_attention"] = {str(s): [[m, attn(m, s, 1.0)] for m in sizes] for s in SHARES}
  t["prefill_attention"] = {str(s): [[m, attn(m, s, 0.2)] for m in sizes] for s in SHARES}
  return autosearch.Profile(model="synthetic", device="test", num_sms=132, context=1024, times=t)


def test_milp_finds_a_valid_overlapping_pipeline():
  prof = synthetic_profile()
  cfg, ms, seq_ms, schedule = autosearch.search(prof, 2048, 512, shares=SHARES)
  cfg.validate()
  assert sum(cfg.nano_batches) == 2048 and len(cfg.nano_batches) == 2
  assert ms < seq_ms  # the overlap is worth it on this profile
  # the schedule respects the SM budget wherever two streams overlap in time
  for a in schedule:
    for b in schedule:
      if a[1] != b[1] and a[2] < b[2] + b[3] - 1e-6 and b[2] < a[2] + a[3] - 1e-6 and a[3] > 1e-6 and b[3] > 1e-6:
        assert a[4] + b[4] <= 132, (a, b)
  # and a dependency never starts before what it depends on ends
  start = {op_id: (st, d) for op_id, _, st, d, _ in schedule}
  for op in cfg.ops:
    for d in op.deps:
      if not d.startswith("prev:"):
        assert start[op.id][0] >= start[d][0] + start[d][1] - 1e-6


def test_search_hides_the_decode_attention_behind_the_prefill_gemms():
  """Decode rows come first, so the split that pays on a profile where decode attention is the large
  memory-bound op runs nano-batch 1's GEMMs beside nano-batch 0's attention (the template's lead 1)."""
  cfg, ms, seq_ms, _ = autosearch.search(synthetic_profile(), 2048, 512, shares=SHARES)
  attn = {o.nano_batch: o for o in cfg.ops if o.op == "attention"}
  assert attn[0].sm_share < 132 and attn[1].sm_share == 132
  beside = {o.id for o in cfg.ops if o.op in ("o", "gate_up", "down") and o.sm_share < 132}
  assert beside and all(i.endswith("@1") for i in beside)
  assert attn[0].sm_share + min(o.sm_share for o in cfg.ops if o.id in beside) <= 132


@pytest.mark.parametrize("flags_,match", [
    (["--from_profile", "--beside_attention=prefetch_pages=1"], "profiling choice"),
    (["--beside_attention=block_n=64"], "cannot change"),
    (["--beside_attention=prefetch_pages"], "key=integer")])
def test_cli_refuses_a_bad_beside_attention_before_any_work(tmp_path, flags_, match):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "autosearch.py"), "--model=synthetic",
                      "--device_kind=test", f"--out_dir={tmp_path}", *flags_],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode != 0 and match in r.stderr, r.stderr[-2000:]
  assert not os.listdir(tmp_path)


def test_profile_interpolation():
  prof = synthetic_profile()
  assert prof.time("qkv", 768, 132) == pytest.approx(0.15 * 0.768)
  assert prof.time("qkv", 4096, 132) == pytest.approx(0.15 * 4.096)   # linear beyond the table
  assert prof.time("qkv", 100, 100) == pytest.approx(prof.time("qkv", 100, 132))  # the next share up


def test_cli_from_profile(tmp_path, monkeypatch):
  prof_path = autosearch.profile_path("synthetic", "test")
  os.makedirs(os.path.dirname(prof_path), exist_ok=True)
  prof = synthetic_profile()
  prof.beside_attention = {"prefetch_pages": 1, "num_stages": 3}   # profiled with this variant on shares
  with open(prof_path, "w") as f:
    f.write(prof.to_json())
  try:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "autosearch.py"), "--model=synthetic",
                        "--device_kind=test", f"--out_dir={tmp_path}", "--from_profile"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = PipelineConfig.load(str(tmp_path / "pipeline_synthetic_test.json"))
    assert cfg.name.startswith("autosearch")
    assert cfg.beside_attention == prof.beside_attention   # the config says how its shares were timed
    assert os.path.getsize(tmp_path / "gantt_synthetic_test.png") > 1000
    assert "predicted layer" in r.stdout
  finally:
    os.remove(prof_path)


def test_shipped_config_lookup():
  class Dev:
    platform, device_kind = "gpu", "NVIDIA H200"
  cfg = autosearch.shipped_config("llama-3-8b", Dev(), 2048)
  assert cfg is not None and cfg.name.startswith("autosearch") and sum(cfg.nano_batches) == 2048
  assert cfg.nano_batches == [2048]    # the H200 tables predict no split faster than the whole batch
  assert autosearch.shipped_config("llama-3-8b", Dev(), 1024) is None   # made for another dense batch
  assert autosearch.shipped_config("tiny", Dev(), 2048) is None   # no tiny config for an H200
  stored = autosearch.Profile.load(autosearch.profile_path("llama-3-8b", "h200"))
  assert stored.num_sms == 132 and set(stored.times) >= {"qkv", "decode_attention", "rope_append"}


def test_search_ships_the_single_batch_when_no_split_pays():
  """Attention that slows down with fewer SMs as much as the GEMMs do: overlap cannot win (what the H200
  tables of 2026-11-21 say), so the search returns one nano-batch on the whole GPU, and says so."""
  prof = synthetic_profile()
  for kind in ("decode_attention", "prefill_attention"):
    for s in SHARES:
      prof.times[kind][str(s)] = [[m, t * 132 / s] for m, t in prof.times[kind]["132"]]
  cfg, ms, seq_ms, schedule = autosearch.search(prof, 2048, 512, shares=SHARES)
  assert cfg.nano_batches == [2048] and ms == pytest.approx(seq_ms)
  assert all(op.sm_share == 132 for op in cfg.ops) and cfg.name.endswith("single")
  assert [row[0] for row in schedule] == [op.id for op in cfg.ops]


def test_shipped_tiny_config():
  class Dev:
    platform, device_kind = "cpu", "cpu"
  cfg = autosearch.shipped_config("tiny", Dev(), 256)
  assert cfg is not None and len(cfg.nano_batches) == 2


def test_measured_interference_can_cancel_the_overlap():
  """The same profile where overlap pays, with pair factors of 1.5 (kernels beside each other run 50% longer
  than the longer alone): the search falls back to the single batch."""
  prof = synthetic_profile()
  cfg, ms, seq_ms, _ = autosearch.search(prof, 2048, 512, shares=SHARES)
  assert len(cfg.nano_batches) == 2 and ms < seq_ms
  prof.interference = {str(s): 1.5 for s in SHARES}
  assert prof.slowdown(100) == 1.5
  cfg, ms, seq_ms, _ = autosearch.search(prof, 2048, 512, shares=SHARES)
  assert cfg.nano_batches == [2048]
  prof.interference = {"99": 1.02}        # mild interference keeps the split
  cfg, ms2, _, _ = autosearch.search(prof, 2048, 512, shares=SHARES)
  assert len(cfg.nano_batches) == 2 and ms2 < seq_ms


def tp_profile(allreduce_ms_per_1k: float) -> autosearch.Profile:
  """The synthetic profile at TP 2, where GEMMs lose more than linearly on fewer SMs (the H200's case:
  on one device no split pays) and each all-reduce of a partial sum costs `allreduce_ms_per_1k` per 1k
  rows on its 16 SMs."""
  prof = synthetic_profile()
  sizes = [256, 512, 1024, 2048]
  for op in ("qkv", "o", "gate_up", "down"):
    for s, pts in prof.times[op].items():
      prof.times[op][s] = [[m, ms * (132 / int(s)) ** 0.5] for m, ms in pts]
  prof.times["decode_attention"] = {str(s): [[m, m / 1000 * 132 / s] for m in sizes] for s in SHARES}
  prof.times["prefill_attention"] = {str(s): [[m, 0.2 * m / 1000 * 132 / s] for m in sizes] for s in SHARES}
  prof.times["allreduce"] = {str(NETWORK_SMS): [[m, allreduce_ms_per_1k * m / 1000] for m in sizes]}
  prof.tp = 2
  return prof


def test_search_models_the_network_class_under_tp():
  # Nearly free all-reduces: nothing to hide, and splitting the SMs only costs: the single batch ships.
  cfg, ms, seq_ms, _ = autosearch.search(tp_profile(0.001), 2048, 512, shares=SHARES)
  assert len(cfg.nano_batches) == 1 and cfg.tp == 2
  assert [o.op for o in cfg.ops].count("o_allreduce") == 1
  # Costly all-reduces: a split hides one nano-batch's beside the other's compute and wins.
  cfg, ms, seq_ms, schedule = autosearch.search(tp_profile(0.6), 2048, 512, shares=SHARES)
  cfg.validate()
  assert len(cfg.nano_batches) == 2 and cfg.tp == 2 and ms < seq_ms
  is_net = lambda op_id: RESOURCE[op_id.split("@")[0]] == "network"
  net = [row for row in schedule if is_net(row[0])]
  assert len(net) == sum(is_net(o.id) for o in cfg.ops) >= 4
  assert all(row[4] == NETWORK_SMS for row in net)   # their fixed share
  compute = [row for row in schedule if not is_net(row[0])]
  overlaps = lambda a, b: a[2] < b[2] + b[3] - 1e-6 and b[2] < a[2] + a[3] - 1e-6
  assert any(overlaps(a, c) for a in net for c in compute if a[0][-1] != c[0][-1])
  # without stream annotation under TP only collectives run beside other work
  assert not any(overlaps(a, c) for a in compute for c in compute if a is not c and a[3] > 1e-6 and c[3] > 1e-6)
  assert seq_ms == pytest.approx(sum(autosearch.op_time(tp_profile(0.6), op, 2048, 512, 132) for op in
                                     ("qkv", "rope_append", "attention", "o", "o_allreduce", "gate_up", "down",
                                      "down_allreduce")))


def test_search_weighs_the_allgather_form_of_o():
  """Each nano-batch's o takes the form its collectives' measured cost favours: gathers at half an
  all-reduce split o's network time in two and the search uses them; gathers as dear as an all-reduce
  would double it, and it keeps the all-reduces."""
  forms = lambda cfg: {cfg.ops_of(nb) for nb in range(len(cfg.nano_batches))}
  for gather_cost, want in ((0.5, AG_OPS), (1.0, TP_OPS)):
    prof = tp_profile(0.6)
    prof.times["allgather"] = {s: [[m, gather_cost * ms] for m, ms in pts] for s, pts in prof.times["allreduce"].items()}
    cfg, ms, seq_ms, _ = autosearch.search(prof, 2048, 512, shares=SHARES)
    assert len(cfg.nano_batches) == 2 and want in forms(cfg), (gather_cost, forms(cfg))
    if want == TP_OPS:
      assert forms(cfg) == {TP_OPS}


COLLECTIVES_PROFILE = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from absl import flags
from launch import autosearch as cli
flags.FLAGS(["autosearch"])
print(cli.profile_collectives(64, [16, 32], 2))
"""


def test_collective_profiling_and_tp_names(tmp_path):
  """Stage 1's network tables on 2 CPU devices, and TP profiles and configs named apart from one GPU's."""
  r = subprocess.run([sys.executable, "-c", COLLECTIVES_PROFILE], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  tables = eval(r.stdout.strip().splitlines()[-1])
  key = str(NETWORK_SMS)
  assert sorted(tables) == ["allgather", "allreduce"]
  for table in tables.values():
    assert list(table) == [key] and [row[0] for row in table[key]] == [16, 32]
    assert all(row[1] > 0 for row in table[key])
  assert autosearch.profile_path("llama-2-70b", "h200", 2).endswith("llama-2-70b_h200_tp2.json")
  assert autosearch.profile_path("llama-3-8b", "h200").endswith("llama-3-8b_h200.json")

  class Dev:
    platform, device_kind = "gpu", "NVIDIA H200"
  assert autosearch.shipped_config("llama-3-8b", Dev(), 2048, tp=2) is None   # the one-GPU config is not used


MEASURE = r"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
from absl import flags
from launch import autosearch as cli
flags.FLAGS(["autosearch", "--model=tiny", "--decodes=4", "--context=40", "--dense_batch=16",
             "--out_dir=" + sys.argv[1]])
from nanoflow_jax.runtime.plan import decode_overlap
cli.measure("tiny", decode_overlap(16, 132, 4), 1.0, 1.0, "tiny_cpu")
"""


def test_measure_runs_the_real_step(tmp_path):
  """The GPU run's last stage (time the real step sequentially and split) imports and runs on a CPU: it
  once failed there on the step bench's flags being defined twice."""
  r = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=600,
                     cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr[-3000:]
  line = r.stdout.strip().splitlines()[-1]
  assert line.startswith("measured step (16 tokens (4 decodes") and "best split [8, 8]" in line, line


def test_nanoflow_splits_is_decided_before_the_backend(tmp_path):
  """The stream flags go on only where mode nanoflow would split the step: the engine's own choice of
  plan, read from the flags and nvidia-smi's GPU name before JAX starts."""
  h200 = "NVIDIA H200"
  # the shipped H200 configs are the whole batch (one GPU, TP 2 and 4): no streams
  assert not autosearch.nanoflow_splits("llama-3-8b", None, 1, None, h200)
  assert not autosearch.nanoflow_splits("llama-3-8b", 2048, 1, None, h200)
  assert not autosearch.nanoflow_splits("llama-2-70b", 2048, 4, None, h200)
  # no shipped config for this dense batch, GPU or model: the generic split, which needs them
  assert autosearch.nanoflow_splits("llama-3-8b", 1024, 1, None, h200)
  assert autosearch.nanoflow_splits("llama-3-8b", 2048, 1, None, "NVIDIA A100-SXM4-80GB")
  assert autosearch.nanoflow_splits("llama-3-8b", 2048, 1, None, None)          # no GPU name: cannot tell
  assert autosearch.nanoflow_splits("no-such-model", 2048, 1, None, h200)
  assert autosearch.nanoflow_splits("llama-3-8b", 2048, 1, "generic", h200)      # asked for
  one = tmp_path / "one.json"
  one.write_text(autosearch.shipped_config_for_kind("llama-3-8b", "h200", 2048).to_json())
  assert not autosearch.nanoflow_splits("llama-3-8b", 2048, 1, str(one), None)
  two = tmp_path / "two.json"
  two.write_text(autosearch.shipped_config_for_kind("tiny", "cpu", 256).to_json())
  assert autosearch.nanoflow_splits("tiny", 256, 1, str(two), None)
  assert autosearch.gpu_kind_key("NVIDIA H200") == "h200" and autosearch.gpu_kind_key("Tesla T4") == "tesla-t4"


def test_fp8_variant_names_and_falls_back_to_the_plain_config(tmp_path, monkeypatch, caplog):
  """The fp8 variant (fp8 GEMMs, fp8 KV cache) has profiles and shipped configs of its own (<name>_fp8); where
  none is shipped, fp8 weights take the plain config and the log says it was searched with bf16 kernels."""
  import logging
  assert autosearch.config_name("llama-3-8b", "h200", 1, "fp8") == "llama-3-8b_h200_fp8"
  assert autosearch.config_name("llama-2-70b", "h200", 4, "fp8") == "llama-2-70b_h200_tp4_fp8"
  assert autosearch.profile_path("m", "h200", 1, "fp8").endswith("profiles/m_h200_fp8.json")
  with pytest.raises(ValueError, match="variant"):
    autosearch.config_name("m", "h200", 1, "int4")
  assert autosearch.weights_variant(True) == "fp8" and autosearch.weights_variant(False) == ""
  with caplog.at_level(logging.INFO, logger=autosearch.__name__):
    plain = autosearch.shipped_config_for_kind("llama-3-8b", "h200", 2048, 1, "fp8")
  assert plain is not None and plain.nano_batches == [2048] and "searched with bf16" in caplog.text
  # an fp8 config of its own wins over the plain one
  monkeypatch.setattr(autosearch, "SHIPPED_DIR", str(tmp_path))
  two = synthetic_profile()
  cfg, *_ = autosearch.search(two, 2048, 512, shares=SHARES)
  assert len(cfg.nano_batches) == 2
  (tmp_path / "llama-3-8b_h200_fp8.json").write_text(cfg.to_json())
  (tmp_path / "llama-3-8b_h200.json").write_text(autosearch.PipelineConfig.load(
      os.path.join(ROOT, "nanoflow_jax", "runtime", "configs", "llama-3-8b_h200.json")).to_json())
  assert autosearch.shipped_config_for_kind("llama-3-8b", "h200", 2048, 1, "fp8").nano_batches == cfg.nano_batches
  assert autosearch.shipped_config_for_kind("llama-3-8b", "h200", 2048).nano_batches == [2048]
  # read before the backend starts: fp8 weights (the flag) split where their config splits, bf16 ones do not
  assert autosearch.nanoflow_splits("llama-3-8b", 2048, 1, None, "NVIDIA H200", "fp8")
  assert not autosearch.nanoflow_splits("llama-3-8b", 2048, 1, None, "NVIDIA H200", None)
  assert not autosearch.nanoflow_splits("llama-3-8b", 2048, 1, None, "NVIDIA H200", "none")


def test_cli_searches_the_fp8_profile(tmp_path):
  """--quantization=fp8 --from_profile reads the fp8 profile and writes the fp8 config; the plain profile
  stays unread. Refused under TP before any work."""
  prof_path = autosearch.profile_path("synthetic", "test", 1, "fp8")
  prof = synthetic_profile()
  prof.variant, prof.power_w = "fp8", {"gate_up": 681.0, "pair:99": 690.0}
  with open(prof_path, "w") as f:
    f.write(prof.to_json())
  try:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "autosearch.py"), "--model=synthetic",
                        "--device_kind=test", f"--out_dir={tmp_path}", "--from_profile", "--quantization=fp8"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pipeline_synthetic_test_fp8.json").exists()
    assert autosearch.Profile.load(prof_path).power_w == prof.power_w   # power round-trips with the table
  finally:
    os.remove(prof_path)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "autosearch.py"), "--model=llama-2-70b",
                      "--device_kind=test", f"--out_dir={tmp_path / 'tp'}", "--quantization=fp8", "--tp=2"],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode != 0 and "one GPU" in r.stderr


def test_power_windows_keep_the_median_of_each_keys_readings():
  """Stage 1's power (launch/power.Windows): GPU 0's readings inside a key's windows, their median; work run
  under no key keeps no window."""
  import time as time_mod
  sys.path.insert(0, ROOT)
  from launch import power

  class FakeSampler:
    samples = []
  powered = power.Windows(FakeSampler())
  assert powered.run(None, lambda: 7) == 7 and powered.windows == {}
  assert powered.run("qkv", lambda: 8) == 8 and len(powered.windows["qkv"]) == 1
  t0 = time_mod.perf_counter() + 10
  powered.windows = {"gate_up": [(t0, t0 + 1)], "pair:66": [(t0 + 2, t0 + 3)]}
  reading = lambda w, gpu=0: {"power_w": w, "gpu": gpu}
  FakeSampler.samples = [(t0 + 0.1, reading(600.0)), (t0 + 0.5, reading(700.0)), (t0 + 0.9, reading(650.0)),
                         (t0 + 0.5, reading(100.0, gpu=1)), (t0 + 1.5, reading(50.0)), (t0 + 2.5, reading(690.0))]
  assert powered.medians() == {"gate_up": 650.0, "pair:66": 690.0}



# Run in a process of its own: launch/autosearch.py defines absl flags that other modules in a test worker define too.
STAGE1 = r"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
from absl import flags
from launch import autosearch as cli
from nanoflow_jax import config as config_lib
from pallas_kernels import gemm, gemm_fp8, paged_attention
flags.FLAGS(["autosearch", "--compile_workers=3"])
fp8 = sys.argv[1] == "fp8"
seen, gemm_shares = [], []

def fake_attention(backend, q, kc, vc, layer, table, slots, positions, *rest, num_sms, config, **kw):
  seen.append(("decode" if table.shape[0] == q.shape[0] else "prefill", q.shape[0], table.shape, num_sms))
  return q * 2

def on_share(ref):
  def call(*args, num_sms, **kw):
    gemm_shares.append((args[0].shape[0], num_sms))
    return ref(*args)
  return call

paged_attention.attention_call = fake_attention
gemm.gemm = on_share(gemm.gemm_reference)
gemm_fp8.gemm_fp8 = on_share(gemm_fp8.gemm_fp8_reference)
gemm_fp8.gemm_fp8_silu_mul = on_share(gemm_fp8.gemm_fp8_silu_mul_reference)
prof = cli.profile(config_lib.named_shape("tiny"), [4, 2], [16, 32], 32, fp8=fp8)
for op in ("qkv", "o", "gate_up", "down", "rope_append", "decode_attention", "prefill_attention"):
  for share in ("4", "2"):
    rows = prof.times[op][share]
    assert [m for m, _ in rows] == [16, 32], (op, share, rows)
    assert all(t > 0 for _, t in rows), (op, share, rows)
assert sorted(gemm_shares) == sorted((m, s) for _ in range(4) for m in (16, 32) for s in (4, 2)), gemm_shares
# each attention case traced once, with its own rows' table: decode m sequences, prefill one prompt of m
assert sorted(seen) == sorted([("decode", m, (m, 2), s) for m in (16, 32) for s in (4, 2)] +
                              [("prefill", m, (1, m // 16 + 1), s) for m in (16, 32) for s in (4, 2)]), seen
assert prof.variant == ("fp8" if fp8 else "")

# outputs are written whole: killed before the rename, the old file stands, not half of the new
target = os.path.join(sys.argv[2], "pipeline.json")
open(target, "w").write("old")
real_replace = os.replace
def killed(*a):
  raise KeyboardInterrupt
os.replace = killed
try:
  cli._write(target, "new")
except KeyboardInterrupt:
  pass
assert open(target).read() == "old"
os.replace = real_replace
cli._write(target, "new")
assert open(target).read() == "new" and not [p for p in os.listdir(sys.argv[2]) if ".tmp" in p]
print("stage 1 ok")
"""


@pytest.mark.parametrize("variant", ["bf16", "fp8"])
def test_stage1_profile_times_each_case_with_its_own_inputs(tmp_path, variant):
  """Stage 1 compiles every kernel case first (on threads), then times each: each table row must come from its
  own op, share and inputs (a case built in a loop and compiled later must not take the loop's last values).
  The GPU kernels are stood in for by their references; the fakes record what each case was built with. Also:
  a device call's time limit may kill the search mid-write, so every output is replaced whole or not at all."""
  r = subprocess.run([sys.executable, "-c", STAGE1, variant, str(tmp_path)], capture_output=True, text=True,
                     timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0 and "stage 1 ok" in r.stdout, r.stderr[-3000:]
