"""lab/kernel_bench.py's --silu_mul, --prefill_ceiling and --rope_append code paths on the CPU: the fused gate_up
rows on a tiny shape in interpret mode, the prefill problem built for both kernels from the same tokens, and the
KV-append rows (the Triton kernel stood in for by its reference, which the interpreter tests check)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SILU_MUL = """
import sys
sys.path.insert(0, "tests")
from absl import flags
from lab import kernel_bench
from kernel_utils import gpu_interpret, one_call
flags.FLAGS(["kernel_bench"])
kernel_bench.timeit = one_call   # the code path and the errors, not timings: one interpreted call each
with gpu_interpret():
  rows = kernel_bench.bench_silu_mul([1], peak=1.0, iters=1, shapes={"tiny": (128, 512, 128)})
print("VARIANTS", len(kernel_bench.SILU_MUL_VARIANTS))
print("ROWS", rows)
"""

PREFILL_PROBLEM = """
import jax, jax.numpy as jnp, numpy as np
from absl import flags
from lab import kernel_bench
from pallas_kernels.paged_attention import paged_attention_reference
flags.FLAGS(["kernel_bench"])
keys = jax.random.split(jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30))), 3)
q = jax.random.normal(keys[0], (3, 48, 8, 32), jnp.float32)
k, v = (jax.random.normal(key, (3, 48, 2, 32), jnp.float32) for key in keys[1:])
qq, (kc, vc), table, slots, positions, chunks, work = kernel_bench._prefill_problem(q, k, v)
ours = np.asarray(paged_attention_reference(qq, kc, vc, 0, table, slots, positions)).reshape(q.shape)
# Causal attention of each prompt over its own tokens, written out (scaled as ours is).
logits = jnp.einsum("bqhgd,bkhd->bqhgk", q.reshape(3, 48, 2, 4, 32) / np.sqrt(32), k)
mask = np.tril(np.ones((48, 48), bool))[None, :, None, None, :]
w = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
ref = np.asarray(jnp.einsum("bqhgk,bkhd->bqhgd", w, v)).reshape(q.shape)
print("ERR", float(np.abs(ours - ref).max()), "CHUNKS", chunks, "WORK", work)
"""

ROPE_APPEND = """
from absl import flags
from lab import kernel_bench
from pallas_kernels import rope_append_triton
flags.FLAGS(["kernel_bench"])
kernel_bench.timeit = lambda fn, *a, iters: (fn(*a), 1e-3)[1]
rope_append_triton.rope_append = lambda *a, num_sms: rope_append_triton.rope_append_reference(*a)
print("ROWS", kernel_bench.bench_rope_append(1, copy_tbs=1.0, n=40, pages=8))
"""

PREFILL_CHUNKS = """
import jax, jax.numpy as jnp, numpy as np
from absl import flags
from lab import kernel_bench
from pallas_kernels.paged_attention import paged_attention_reference
flags.FLAGS(["kernel_bench", "--prefill_chunks=40,24", "--attention_kv_dtype=bfloat16"])
q, (kc, vc), table, slots, positions, chunks, work = kernel_bench._attention_problem("prefill", hkv=2, g=2)
ours = np.asarray(paged_attention_reference(q, kc, vc, 0, table, slots, positions), np.float32)
errs = []
for i, (first, n) in enumerate([(0, 40), (40, 24)]):   # each prompt's causal attention over its own pages
  k = np.asarray(kc[0][:, table[i]].reshape(2, -1, 128)[:, :n], np.float32)
  v = np.asarray(vc[0][:, table[i]].reshape(2, -1, 128)[:, :n], np.float32)
  qq = np.asarray(q[first:first + n], np.float32).reshape(n, 2, 2, 128) / np.sqrt(128)
  s = np.einsum("qhgd,hkd->qhgk", qq, k)
  s = np.where(np.tril(np.ones((n, n), bool))[:, None, None, :], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
  ref = np.einsum("qhgk,hkd->qhgd", w, v).reshape(n, 4, 128)
  errs.append(float(np.abs(ours[first:first + n] - ref).max()))
print("ERR", max(errs), "CHUNKS", chunks, "WORK", work, "PAGES", kc.shape[2])
"""

DECODE_SPREAD = """
import jax.numpy as jnp, numpy as np
from absl import flags
from lab import kernel_bench
from pallas_kernels.paged_attention import paged_attention_reference
flags.FLAGS(["kernel_bench", "--decode_context=1024", "--decode_spread=0.5", "--attention_kv_dtype=bfloat16"])
q, (kc, vc), table, slots, positions, chunks, work = kernel_bench._attention_problem("decode", hkv=1, g=2)
ctx = positions + 1
pages_used = np.concatenate([table[i, :-(-c // 16)] for i, c in enumerate(ctx)])
rows = np.array([0, 7, 300])
ours = np.asarray(paged_attention_reference(q[rows], kc, vc, 0, table, slots[rows], positions[rows]), np.float32)
errs = []
for j, i in enumerate(rows):   # sequence i's attention over its own keys, gathered page by page
  k = np.asarray(kc[0][0][table[i]].reshape(-1, 128)[:ctx[i]], np.float32)
  v = np.asarray(vc[0][0][table[i]].reshape(-1, 128)[:ctx[i]], np.float32)
  s = np.asarray(q[i], np.float32) @ k.T / np.sqrt(128)
  w = np.exp(s - s.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
  errs.append(float(np.abs(ours[j] - w @ v).max()))
print("ERR", max(errs), "MIN", int(ctx.min()), "MAX", int(ctx.max()), "N", len(ctx), "WORK", work, "SUM", int(ctx.sum()),
      "UNIQUE", len(np.unique(pages_used)) == len(pages_used))
"""


def _run(code):
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=ROOT,
                     env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_silu_mul_bench_checks_every_variant_and_fails_none():
  import ast
  out = _run(SILU_MUL)    # (launch modules define absl flags: imported in a subprocess only)
  variants = int(out.split("VARIANTS", 1)[1].split()[0])
  rows = ast.literal_eval(out.split("ROWS", 1)[1].strip())
  fused = [r for r in rows if ": fused" in r[0]]
  # The default and every variant at the one share; each with its error against the reference.
  assert variants >= 4 and len(fused) == 1 + variants, rows
  assert not [r for r in rows if "FAILED" in r[2]], rows
  for label, *_ in fused:
    assert float(label.split("rel. error ")[1].rstrip(")")) < 2e-2, label
  assert sum("our GEMM + XLA silu_mul" in r[0] for r in rows) == 1


def test_prefill_problem_holds_each_prompt_in_its_own_pages():
  out = _run(PREFILL_PROBLEM).split()
  assert float(out[out.index("ERR") + 1]) < 1e-5
  assert "[48, 48, 48]" in " ".join(out)


def test_kv_append_bench_times_the_unique_and_the_atomic_scatter_on_both_caches():
  import ast
  rows = ast.literal_eval(_run(ROPE_APPEND).split("ROWS", 1)[1].strip())
  for cache in ("bfloat16", "float8_e4m3fn"):
    timed = [r[0] for r in rows if r[0].startswith(f"rope+append {cache} cache,")]
    assert [t.split(", ", 1)[1] for t in timed] == ["xla (40 tokens)", "xla, atomic scatter (40 tokens)",
                                                    "triton (40 tokens)"], rows
    # the scatter without the promise writes what the engine's does, bit for bit
    diff = [r for r in rows if r[0] == f"rope+append {cache} cache: xla, atomic scatter vs xla, max difference"]
    assert diff and float(diff[0][2]) == 0.0, rows


def test_prefill_chunks_lay_out_several_prompts_each_in_its_own_pages():
  out = _run(PREFILL_CHUNKS).split()
  assert float(out[out.index("ERR") + 1]) < 2e-2   # (bf16 queries and cache)
  assert "[40, 24]" in " ".join(out)
  assert int(out[out.index("WORK") + 1]) == 2 * (40 * 40 + 24 * 24) * 4 * 128
  assert int(out[out.index("PAGES") + 1]) == 3 + 2


def test_decode_spread_gives_each_sequence_its_own_context_and_pages():
  out = _run(DECODE_SPREAD).split()
  val = lambda k: out[out.index(k) + 1]
  assert float(val("ERR")) < 2e-2 and val("UNIQUE") == "True"
  assert 512 <= int(val("MIN")) < 600 and 1450 < int(val("MAX")) <= 1536 and int(val("N")) == 512
  assert int(val("WORK")) == 2 * int(val("SUM")) * 1 * 128 * 2   # K and V bytes of every context, bf16
