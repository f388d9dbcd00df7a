"""An offline run's schedule without a model: what the scheduler makes of a workload, and what it costs.

The real Scheduler and PagePool are driven as the engine drives them (each sampled row gets its token
one step later), and each step is costed by a step-time fit measured on the GPU (the benchmark prints
it: step ms ~ fixed + per 1k tokens of the padded bucket + per 1M decode-context tokens; the JSON has it
under offline.step_summary.fit). Prints the simulated whole-run throughput, the share of full steps and
the steady rate for each setting, to weigh scheduling settings (dense batch, KV capacity, sequence slots)
before spending device time on them. Check it first against a measured run's own figures.

  python lab/schedule_sim.py --workload=splitwise --num_requests=1000 --kv_tokens=1649360 \\
      --fit=6.8,24.78,24.44 --dense_batch=2048,4096
"""
from __future__ import annotations

if __package__ in (None, ""):
  import _root  # noqa: F401  (the repository root on sys.path: lab/_root.py)

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workload", "1024-512", "Workload name (launch/workloads.py) or use --workload_file.")
flags.DEFINE_string("workload_file", None, "CSV with ContextTokens,GeneratedTokens columns.")
flags.DEFINE_integer("num_requests", 1000, "Requests, all arriving at once (the offline benchmark).")
flags.DEFINE_integer("kv_tokens", 824672, "KV cache capacity in tokens (the engine logs it at start).")
flags.DEFINE_integer("page_size", 16, "KV page size.")
flags.DEFINE_list("dense_batch", ["2048"], "Dense batch sizes to simulate.")
flags.DEFINE_list("max_num_seqs", ["1024"], "Sequence slots to simulate.")
flags.DEFINE_integer("max_model_len", 4096, "Longest sequence.")
flags.DEFINE_list("fit", ["6.8", "24.78", "24.44"], "Step time fit: fixed ms, ms per 1k bucket tokens, ms per 1M "
                  "decode-context tokens.")
flags.DEFINE_string("model", "llama-3-8b", "Named shape: its parameter count sets the optimum (percent of optimal).")
flags.DEFINE_integer("num_devices", 1, "GPUs of the run the fit came from (the optimum scales with them).")
flags.DEFINE_float("gemm_peak_tflops", 858.0, "GEMM peak of the run the fit came from.")


def simulate(requests, kv_tokens: int, page_size: int, dense_batch: int, max_num_seqs: int, max_model_len: int,
             fit: tuple[float, float, float], max_steps: int = 1_000_000) -> dict:
  """requests: [(input tokens, output tokens)]. Returns the run's simulated totals and step mix."""
  from nanoflow_jax.kv_cache import PagePool
  from nanoflow_jax.runtime.executor import buckets_for
  from nanoflow_jax.sampling_params import SamplingParams
  from nanoflow_jax.scheduler import Scheduler
  from nanoflow_jax.sequence import Sequence
  from launch.step_records import FULL_BATCH
  pool = PagePool(kv_tokens // page_size, page_size)
  sched = Scheduler(pool, dense_batch, max_num_seqs, max_model_len)
  for i, (n_in, n_out) in enumerate(requests):
    sched.add(Sequence(i, f"r{i}", 0, [1] * n_in, SamplingParams(max_tokens=n_out, ignore_eos=True), seed=0))
  buckets = buckets_for(dense_batch, 128 if dense_batch >= 128 else 8)
  fixed, per_1k, per_1m = fit
  seconds = tokens = full_seconds = full_tokens = 0.0
  steps = full = 0
  pending = []
  while sched.has_work() or pending:
    if steps >= max_steps:
      raise RuntimeError(f"the schedule did not drain in {max_steps} steps")
    batch = sched.schedule()
    for seq in pending:               # the previous step's tokens arrive now
      if seq.finished:
        continue
      seq.inflight -= 1
      seq.output_ids.append(1)
      if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
        sched.finish(seq, "length")
    pending = [c.seq for c in batch.chunks if c.sample] if batch else []
    if batch is None:
      continue
    bucket = next(b for b in buckets if batch.num_tokens <= b)
    context = sum(c.start + c.length for c in batch.chunks if c.decode)   # as the engine's StepRecord
    ms = fixed + per_1k * bucket / 1e3 + per_1m * context / 1e6
    steps += 1
    seconds += ms / 1e3
    tokens += batch.num_tokens
    if batch.num_tokens >= FULL_BATCH * dense_batch:
      full += 1
      full_seconds += ms / 1e3
      full_tokens += batch.num_tokens
  return {"steps": steps, "full_steps": full, "seconds": seconds, "tokens_per_s": tokens / seconds,
          "steady_tokens_per_s": full_tokens / full_seconds if full else 0.0,
          "preemptions": sched.num_preemptions, "mean_tokens_per_step": tokens / max(steps, 1)}


def main(argv):
  del argv
  from launch import workloads
  requests = workloads.lengths(FLAGS.workload, FLAGS.num_requests, workload_file=FLAGS.workload_file,
                               max_model_len=FLAGS.max_model_len)
  fit = tuple(float(x) for x in FLAGS.fit)
  from nanoflow_jax.config import named_shape
  cfg = named_shape(FLAGS.model)
  if cfg is None:
    raise app.UsageError(f"unknown named shape {FLAGS.model!r}")
  optimal = FLAGS.num_devices * FLAGS.gemm_peak_tflops * 1e12 / (2 * cfg.num_params())
  print(f"{FLAGS.workload_file or FLAGS.workload}, {len(requests)} requests, KV {FLAGS.kv_tokens} tokens, "
        f"step ms ~ {fit[0]} + {fit[1]} per 1k tokens + {fit[2]} per 1M context; optimal {optimal:,.0f} tok/s")
  print("| dense batch | slots | tok/s | % of optimal | steps (full) | steady tok/s | tokens per step | preemptions |")
  print("|---|---|---|---|---|---|---|---|")
  for dense in map(int, FLAGS.dense_batch):
    for slots in map(int, FLAGS.max_num_seqs):
      r = simulate(requests, FLAGS.kv_tokens, FLAGS.page_size, dense, slots, FLAGS.max_model_len, fit)
      print(f"| {dense} | {slots} | {r['tokens_per_s']:,.0f} | {100 * r['tokens_per_s'] / optimal:.1f}% | "
            f"{r['steps']} ({r['full_steps']}) | {r['steady_tokens_per_s']:,.0f} | {r['mean_tokens_per_step']:.0f} | "
            f"{r['preemptions']} |", flush=True)


if __name__ == "__main__":
  app.run(main)
