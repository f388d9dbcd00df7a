"""The OpenAI-compatible server.

  python launch/serve.py                                   # the built-in tiny model, CPU if no GPU
  python launch/serve.py /ckpt/llama3-8b --port=8000       # or --model=/ckpt/llama3-8b
  python launch/serve.py --model=llama-3-8b --random_weights --dense_batch=2048
  # across hosts: the same command on every host; process 0 serves HTTP, the others step with it
  python launch/serve.py --model=/ckpt/llama-2-70b --tp=16 --num_pages=200000 --coordinator_address=HOST0:1234 \
      --num_processes=2 --process_id=0|1
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from launch import engine_flags

FLAGS = flags.FLAGS
engine_flags.define(max_num_seqs=64)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("max_waiting", 1024, "Requests allowed to wait; beyond, 503 with Retry-After.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1 (or env NANOFLOW_API_KEY).")
flags.DEFINE_list("served_model_name", None, "Model name(s) in the API, comma-separated (vLLM: "
                  "--served-model-name A B); the first is the one responses carry; default: --model's base name. "
                  "Requests may also name the model path given.")
flags.DEFINE_integer("seed", None, "Seed of the random draws of requests that bring no seed of their own (vLLM's "
                     "--seed): the same requests in the same order sample the same tokens.")
flags.DEFINE_string("chat_template", None, "A chat template (a Jinja file, or the template itself) replacing the "
                    "tokenizer's own.")
flags.DEFINE_enum("tool_call_parser", None, ["hermes", "llama3_json", "mistral"], "How tool calls are read from the "
                  "output for tool_choice 'auto' (Qwen2.5/Hermes tags, LLaMA-3.1 JSON, Mistral [TOOL_CALLS]); "
                  "'required' and named tools need none.")
flags.DEFINE_bool("enable_auto_tool_choice", False, "vLLM's switch for tool_choice 'auto'; here --tool_call_parser "
                  "alone enables it, and this one without a parser is refused.")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "Log level.")
flags.DEFINE_float("shutdown_timeout", 60.0, "On SIGTERM/SIGINT, seconds to let the requests in flight finish; a "
                   "second signal exits at once.")
flags.DEFINE_integer("max_connections", 1024, "Open client connections allowed; more are closed on accept.")
flags.DEFINE_float("header_timeout", 10.0, "Seconds a connection may stay without a request in progress (after it "
                   "opens, or after its last response) before it is closed: slow or idle clients.")
flags.DEFINE_float("body_timeout", 30.0, "Seconds to read a request's body (then 408).")
flags.DEFINE_float("max_request_mb", 16.0, "Largest request body in MiB (then 413).")
flags.DEFINE_bool("warm_up", True, "Compile every step size (and the host KV tier's copies) before listening, as "
                  "vLLM captures its graphs at start; without it the first request of each size waits for its "
                  "compile (7-13 s each at the 8B shape on an H200). Single-process serving only.")


flags.adopt_module_key_flags(engine_flags)   # --help lists the engine's flags too


def _port_free(host: str, port: int) -> str | None:
  """None where the server could listen on host:port, else why not (checked before the model loads)."""
  import socket
  try:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as aiohttp binds
      s.bind((host, port))
  except OSError as e:
    return f"cannot listen on {host}:{port}: {e.strerror or e}"
  return None


def main(argv):
  logging.basicConfig(level=FLAGS.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if FLAGS.log_level != "debug":   # a quiet start: no per-file orbax lines, no word about a TPU backend
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "jax._src.dispatch"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
  if len(argv) > 2:
    raise app.UsageError(f"one model path at most, got {argv[1:]}")
  if len(argv) == 2:   # `serve.py MODEL`, as vLLM's `vllm serve MODEL`
    if FLAGS["model"].present and FLAGS.model != argv[1]:
      raise app.UsageError(f"the model is given twice: {argv[1]!r} and --model={FLAGS.model!r}")
    FLAGS.model = argv[1]
  if FLAGS.enable_auto_tool_choice and not FLAGS.tool_call_parser:
    raise app.UsageError("--enable_auto_tool_choice needs --tool_call_parser (hermes, llama3_json, mistral)")
  if FLAGS.pipeline_config and FLAGS.mode != "nanoflow":
    raise app.UsageError("--pipeline_config needs --mode=nanoflow")
  busy = _port_free(FLAGS.host, FLAGS.port) if not FLAGS.process_id else None
  if busy:
    logging.error("%s (nothing was loaded)", busy)
    return 2
  multi_host = engine_flags.prepare_process(FLAGS.mode == "nanoflow") and FLAGS.num_processes > 1
  from nanoflow_jax import compat, gc_policy, multihost
  from nanoflow_jax.async_engine import AsyncEngine
  from nanoflow_jax.llm import build_engine
  from nanoflow_jax.server.app import ServerLimits, serve
  t = time.perf_counter()
  try:
    engine = build_engine(FLAGS.model, mode=FLAGS.mode, **engine_flags.engine_kwargs())
  except ValueError as e:   # a setting the engine refuses (e.g. a max_model_len the KV cache cannot hold), or
    # across hosts a process that runs other settings than process 0 (multihost.agree)
    logging.error("cannot start: %s", e)
    return 2
  # (the process's peak memory: a host KV tier's pool reserved at start shows here, and so does its start time)
  logging.info("engine built in %.1f s; process peak memory %.1f GB", time.perf_counter() - t,
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  # Across hosts, process 0 serves HTTP and the others run the same steps on their devices (multihost.py).
  channel = multihost.StepChannel(compat.coordination_store()) if multi_host else None
  if multi_host and FLAGS.process_id != 0:
    gc_policy.freeze_startup_heap()
    multihost.follow(engine, channel)
    return
  if FLAGS.warm_up and not multi_host:   # across hosts every process must run the same steps: not yet
    t = time.perf_counter()
    engine.warm_up()
    logging.info("warmed up in %.1f s: every step size compiled", time.perf_counter() - t)
  if FLAGS.seed is not None:
    engine.seed_unseeded(FLAGS.seed)
  if FLAGS.chat_template:
    template = FLAGS.chat_template
    if os.path.isfile(template):
      with open(template) as f:
        template = f.read()
    engine.tokenizer.chat_template = template
  gc_policy.freeze_startup_heap()   # full collections while serving walk only what requests make
  names = FLAGS.served_model_name or [os.path.basename(os.path.normpath(FLAGS.model))]
  api_key = FLAGS.api_key or os.environ.get("NANOFLOW_API_KEY")
  limits = ServerLimits(max_connections=FLAGS.max_connections, header_timeout=FLAGS.header_timeout,
                        body_timeout=FLAGS.body_timeout, max_request_mb=FLAGS.max_request_mb,
                        shutdown_timeout=FLAGS.shutdown_timeout)
  return asyncio.run(serve(AsyncEngine(engine, max_waiting=FLAGS.max_waiting, channel=channel).start(), names,
                           FLAGS.host, FLAGS.port, api_key, limits=limits, also_answers=(FLAGS.model,),
                           tool_call_parser=FLAGS.tool_call_parser))


def run() -> None:
  """`python launch/serve.py ...` and `nanoflow-jax serve ...`; vLLM's dashed flag names work too."""
  app.run(main, argv=engine_flags.vllm_argv(sys.argv))


if __name__ == "__main__":
  run()
