"""The OpenAI-compatible server.

  python launch/serve.py                                   # the built-in tiny model, CPU if no GPU
  python launch/serve.py --model=/ckpt/llama3-8b --port=8000
  python launch/serve.py --model=llama-3-8b --random_weights --dense_batch=2048
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny", "Checkpoint directory (converted or Hugging Face) or a named shape.")
flags.DEFINE_bool("random_weights", False, "Random weights of the model's shape (benchmarks).")
flags.DEFINE_string("dtype", None, "bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("dense_batch", None, "Tokens per engine step (default: 2048 on GPU, 256 on CPU).")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
flags.DEFINE_integer("num_pages", None, "KV pages (default: from --kv_memory_fraction of free memory).")
flags.DEFINE_float("kv_memory_fraction", 0.9, "Share of free device memory for the KV cache.")
flags.DEFINE_integer("max_model_len", None, "Longest prompt + output (default: the model's).")
flags.DEFINE_integer("max_num_seqs", 64, "Sequences running at once.")
flags.DEFINE_integer("tp", 1, "Tensor parallelism: devices the model is sharded over.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (one per host).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_integer("max_waiting", 1024, "Requests allowed to wait; beyond, 503 with Retry-After.")
flags.DEFINE_enum("mode", "sequential", ["sequential", "nanoflow"], "Step execution mode.")
flags.DEFINE_string("pipeline_config", None, "PipelineConfig JSON for --mode=nanoflow (default: shipped/generic).")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1 (or env NANOFLOW_API_KEY).")
flags.DEFINE_string("served_model_name", None, "Model name in the API (default: --model's base name).")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "Log level.")


def main(argv):
  del argv
  logging.basicConfig(level=FLAGS.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from nanoflow_jax import compat, distributed
  compat.configure_gpu_memory()
  try:
    multi = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if multi and FLAGS.num_processes > 1:
    raise app.UsageError("serving across hosts needs every process to receive the requests, which the server "
                         "does not do yet; run launch/benchmark.py or the offline API across hosts")
  if FLAGS.mode == "nanoflow":
    compat.enable_concurrent_command_buffers()
  from nanoflow_jax.async_engine import AsyncEngine
  from nanoflow_jax.llm import build_engine
  from nanoflow_jax.server.app import serve
  if FLAGS.pipeline_config and FLAGS.mode != "nanoflow":
    raise app.UsageError("--pipeline_config needs --mode=nanoflow")
  engine = build_engine(FLAGS.model, dtype=FLAGS.dtype, random_weights=FLAGS.random_weights,
                        dense_batch=FLAGS.dense_batch, page_size=FLAGS.page_size, num_pages=FLAGS.num_pages,
                        kv_memory_fraction=FLAGS.kv_memory_fraction, max_num_seqs=FLAGS.max_num_seqs,
                        max_model_len=FLAGS.max_model_len, mode=FLAGS.mode, pipeline_config=FLAGS.pipeline_config,
                        tensor_parallel=FLAGS.tp)
  name = FLAGS.served_model_name or os.path.basename(os.path.normpath(FLAGS.model))
  api_key = FLAGS.api_key or os.environ.get("NANOFLOW_API_KEY")
  asyncio.run(serve(AsyncEngine(engine, max_waiting=FLAGS.max_waiting).start(), name, FLAGS.host, FLAGS.port,
                    api_key))


if __name__ == "__main__":
  app.run(main)
