"""One process of a 2-process CPU job (see test_distributed.py)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoflow_jax import distributed  # noqa: E402

distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from nanoflow_jax import parallel  # noqa: E402

mesh = parallel.make_mesh(jax.device_count())          # the tensor-parallel mesh spans both hosts
sharding = NamedSharding(mesh, P("tp"))
x = jax.make_array_from_callback((jax.device_count() * 3,), sharding,
                                 lambda idx: np.arange(jax.device_count() * 3, dtype=np.float32)[idx])
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                  "sum": float(total.addressable_data(0))}))
