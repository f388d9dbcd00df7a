"""lab/clock_probe.py's sampler and per-phase summary, with a stand-in for nvidia-smi."""
import sys
import time

from lab import clock_probe


def test_parse_sample_reads_values_and_reason_bits():
  s = clock_probe.parse_sample("1755, 3201, 689.52, 61, 0x0000000000000004\n")
  assert s == {"sm_mhz": 1755.0, "mem_mhz": 3201.0, "power_w": 689.52, "temp_c": 61.0, "reasons": 4, "gpu": 0}
  s = clock_probe.parse_sample("1980, 3201, [N/A], 40, [N/A]")
  assert s["power_w"] is None and s["reasons"] is None and s["sm_mhz"] == 1980.0
  assert clock_probe.parse_sample("clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], "
                                  "temperature.gpu, clocks_event_reasons.active") is None
  assert clock_probe.parse_sample("Failed to initialize NVML") is None


def test_summarize_takes_each_phase_its_own_samples():
  def reading(mhz, watts, reasons):
    return {"sm_mhz": mhz, "mem_mhz": 3201.0, "power_w": watts, "temp_c": 50.0, "reasons": reasons}
  samples = [(t / 10, reading(1980.0, 100.0, 0x1)) for t in range(0, 10)]          # 0.0-0.9 s: idle
  samples += [(1 + t / 10, reading(1500.0 + t, 690.0 + t, 0x4)) for t in range(10)]  # 1.0-1.9 s: capped
  idle = clock_probe.summarize(samples, 0.0, 0.95)
  busy = clock_probe.summarize(samples, 1.0, 1.95)
  # SKIP_S leaves out the first readings of each window (they still show the phase before)
  assert idle["samples"] == 10 - 3 and busy["samples"] == 10 - 3
  assert idle["sm_mhz"] == 1980.0 and idle["reasons"] == {"idle": 1.0}
  assert busy["sm_mhz"] == 1506.0 and busy["max_power_w"] == 699.0 and busy["reasons"] == {"sw power cap": 1.0}
  empty = clock_probe.summarize(samples, 5.0, 6.0)
  assert empty["samples"] == 0 and empty["sm_mhz"] is None and empty["reasons"] == {}
  text = clock_probe.table([("idle", None, idle), ("gemm", 0.0005, busy), ("late", 0.001, empty)],
                           ["700.00", "700.00", "1980"])
  assert "Power limit 700.00 W" in text
  # mean of 693..699 W = 696 W: the limit allows at most 700 / 696 = 1.01x on this phase's work
  assert "| gemm | 0.500 | 1506 | 3201 | 696 / 696 / 699 | 50 | sw power cap 100% | 1.01x | 7 |" in text
  assert "| late | 1.000 | - | - | - / - / - | - | - | - | 0 |" in text
  idle_row = next(line for line in text.splitlines() if line.startswith("| idle"))
  assert "| 7.00x |" in idle_row   # 700 W over 100 W


def test_speedup_bound_is_the_limit_over_the_mean_power():
  assert clock_probe.speedup_bound(560.0, 700.0) == 1.25
  assert clock_probe.speedup_bound(None, 700.0) is None and clock_probe.speedup_bound(500.0, None) is None


def test_sampler_keeps_timed_readings_from_a_running_command():
  fake_smi = ("import time\n"
              "for i in range(1000):\n"
              "  print(f'{1900 - i}, 3201, 500.0, 45, 0x4', flush=True)\n"
              "  print('garbage', flush=True)\n"
              "  time.sleep(0.01)\n")
  start = time.perf_counter()
  with clock_probe.Sampler([sys.executable, "-c", fake_smi]) as sampler:
    deadline = time.perf_counter() + 20
    while len(sampler.samples) < 5 and time.perf_counter() < deadline:
      time.sleep(0.05)
  assert len(sampler.samples) >= 5, "the sampler kept no readings"
  times = [t for t, _ in sampler.samples]
  assert times == sorted(times) and times[0] >= start
  assert [s["sm_mhz"] for _, s in sampler.samples[:3]] == [1900.0, 1899.0, 1898.0]   # the garbage lines dropped
  n = len(sampler.samples)
  time.sleep(0.2)
  assert len(sampler.samples) == n, "the sampler still runs after the with block"


def test_no_sampler_without_a_command():
  with clock_probe.Sampler(None) as sampler:
    pass
  assert sampler.samples == []


def test_step_phases_hold_whole_steps_in_both_modes():
  # The --step phases on the CPU (tiny model, reference kernels, a stand-in sampler): both steps run and
  # each row gets its own timing and readings.
  fake_smi = ("import time\n"
              "while True:\n"
              "  print('1500, 3201, 690.0, 45, 0x4', flush=True)\n"
              "  time.sleep(0.02)\n")
  phases = clock_probe.step_phases(share=4, decodes=6, context=20, prefill=10, kv_cache_dtype="auto",
                                   model_name="tiny", kernels="reference")
  assert [name.split(",")[1].split()[0] for name, _ in phases] == ["sequential:", "nanoflow"]
  rows = clock_probe.hold_phases(phases, 0.6, [sys.executable, "-c", fake_smi])
  assert [r[0] for r in rows][0] == "idle" and len(rows) == 3
  for name, per_call, summary in rows[1:]:
    assert per_call > 0 and summary["samples"] > 0 and summary["mean_power_w"] == 690.0, name


def test_parse_sample_of_every_gpu_keeps_the_index():
  s = clock_probe.parse_sample("3, 1755, 3201, 689.52, 61, 0x4")
  assert s["gpu"] == 3 and s["power_w"] == 689.52 and s["reasons"] == 4
  assert clock_probe.parse_sample("x, 1755, 3201, 689.52, 61, 0x4") is None


def test_windows_power_bounds_each_gpu_and_the_step_by_the_highest_draw():
  def reading(gpu, watts):
    return {"sm_mhz": 1700.0, "mem_mhz": 3201.0, "power_w": watts, "temp_c": 50.0, "reasons": 0x4, "gpu": gpu}
  samples = [(t / 10, reading(g, 100.0)) for t in range(10) for g in (0, 1)]                  # idle, 0-0.9 s
  samples += [(1 + t / 10, reading(0, 600.0 if t < 10 else 300.0)) for t in range(20)]        # GPU 0
  samples += [(1 + t / 10, reading(1, 500.0 if t < 10 else 200.0)) for t in range(20)]        # GPU 1
  # the windows hold 1.0-1.95 s (full steps); 2.0-2.9 s (a partial step's readings) is outside
  p = clock_probe.windows_power(samples, [(1.0, 1.95)], (0.0, 0.95), 700.0)
  assert p["gpus"][0]["samples"] == 10 and p["gpus"][0]["mean_power_w"] == 600.0
  assert p["gpus"][1]["mean_power_w"] == 500.0 and p["gpus"][1]["idle_mean_power_w"] == 100.0
  assert p["gpus"][0]["bound"] == 700 / 600 and p["gpus"][1]["bound"] == 700 / 500
  assert p["bound"] == 700 / 600   # every GPU does its share of each step: the highest draw bounds it
  assert p["bound_static_idle"] == (700 - 100) / (600 - 100)
  none = clock_probe.windows_power(samples, [], (0.0, 0.95), None)
  assert none["bound"] is None and none["gpus"][0]["mean_power_w"] is None
