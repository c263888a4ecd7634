"""jaxlab: JAX/Flax image classification experiments from two course reports."""

from jaxlab import runtime as _runtime

_runtime.apply_defaults()
