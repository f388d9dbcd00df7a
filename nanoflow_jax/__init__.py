"""nanoflow-jax: throughput-first LLM serving on JAX, Flax and Pallas (NanoFlow's nano-batch pipeline)."""
from nanoflow_jax.model import Model, load_model

__all__ = ["Model", "load_model"]
