"""jaxlab: JAX/Flax image classification experiments from two course reports."""
