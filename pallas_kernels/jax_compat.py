"""JAX version differences the kernels meet (0.10.2 here and in CI, 0.11.2 on the GPU machine). The
kernels sit below nanoflow_jax, so what they need lives here; nanoflow_jax/compat.py holds the rest and
re-exports these."""
from __future__ import annotations


def mosaic_kernel_aliased(body, out_type, mesh, input_output_aliases: dict, compiler_params, name: str):
  """A Mosaic GPU kernel (pl.kernel's) whose output aliases an input: `body(*inputs, out)` writes into the
  aliased buffer in place. pl.kernel aliases only mutable refs (jax.new_ref), and a ref cannot be discharged
  inside a stream annotation's compute_on (measured: "No state discharge rule ... compute_on"), so this
  calls the private function behind pl.kernel, whose signature is the same in jax 0.10.2 and 0.11."""
  from jax._src.pallas import mpmd
  return mpmd._mpmd_map([(mesh, body)], out_type, input_output_aliases=input_output_aliases,
                        compiler_params=compiler_params, name=name)
