"""jaxlab: JAX/Flax image classification experiments from two course reports.

Importing jaxlab changes nothing in the process. For its speed defaults
(XLA flags, malloc settings) call `jaxlab.runtime.apply_defaults()` before
JAX starts, as launch.py and the benchmark do.
"""
