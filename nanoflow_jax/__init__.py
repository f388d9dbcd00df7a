"""nanoflow-jax: throughput-first LLM serving on JAX, Flax and Pallas (NanoFlow's nano-batch pipeline)."""
from nanoflow_jax.compat import configure_gpu_memory

configure_gpu_memory()  # before JAX initializes a GPU backend

from nanoflow_jax.llm import LLM  # noqa: E402
from nanoflow_jax.model import Model, load_model  # noqa: E402
from nanoflow_jax.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "Model", "SamplingParams", "load_model"]
