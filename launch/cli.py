"""The `nanoflow-jax` command (installed by pip: [project.scripts]):

  nanoflow-jax serve MODEL [flags]      the OpenAI-compatible server (launch/serve.py)
  nanoflow-jax bench [flags]            throughput and latency benchmarks (launch/benchmark.py)
  nanoflow-jax convert [flags]          a Hugging Face checkpoint to ours (checkpoints/convert.py)
  nanoflow-jax autosearch [flags]       the nano-batch auto-search (launch/autosearch.py)

Each subcommand is the script of the same job with its absl flags (`nanoflow-jax serve --help`); serve and
bench also take vLLM's dashed flag names (`--max-model-len`, `--tensor-parallel-size`, ...).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"serve": "launch.serve", "bench": "launch.benchmark", "convert": "checkpoints.convert",
            "autosearch": "launch.autosearch"}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(__doc__.strip(), file=sys.stderr)
    return 0 if len(argv) >= 2 and argv[1] in ("-h", "--help", "help") else 2
  command = argv[1]
  module = importlib.import_module(COMMANDS[command])   # only this one's flags are defined
  # absl lists the key flags of the module named by argv[0] under --help
  sys.argv = [module.__name__, *argv[2:]]
  run = getattr(module, "run", None)
  if run is None:
    from absl import app
    app.run(module.main)
  else:
    run()
  return 0


if __name__ == "__main__":
  sys.exit(main())
