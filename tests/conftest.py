import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not os.environ.get("NANOFLOW_GPU_TESTS"):  # tests/gpu run with NANOFLOW_GPU_TESTS=1
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Triton kernels run in Triton's interpreter on the CPU; it must be chosen before triton is imported.
  os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def server():
  """The tiny model's server, shared by the server test files (one start-up for all of them)."""
  from server_process import KEY, ServerProcess
  s = ServerProcess("--api_key=" + KEY, "--max_num_seqs=16", "--dense_batch=128", "--num_pages=2048",
                    "--served_model_name=tiny-test", "--warm_up")
  yield s
  assert s.stop() == 0, s.output()


@pytest.fixture(scope="session")
def client(server):
  import openai
  from server_process import KEY
  return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
