"""Process-wide JAX settings that every entry point applies first.

`apply_xla_defaults` runs when `jaxlab` is imported: XLA reads XLA_FLAGS
once, when its first backend starts, so the defaults reach every program
that imports jaxlab before it computes anything with JAX.
"""

import os

# XLA flags that make training faster on CPU, measured with
# benchmarks/train_step.py. Flags already in XLA_FLAGS win.
XLA_DEFAULTS = {
    # XLA:CPU's YNNPACK fusions run this project's convolutions several
    # times slower than its other path (cnn2's train step: about 5x).
    'xla_cpu_experimental_ynn_fusion_type': '',
}


def apply_xla_defaults() -> None:
  """Adds XLA_DEFAULTS to $XLA_FLAGS, unless the user set those flags."""
  flags = os.environ.get('XLA_FLAGS', '')
  for name, value in XLA_DEFAULTS.items():
    if f'--{name}=' not in flags:
      flags = f'{flags} --{name}={value}'.strip()
  os.environ['XLA_FLAGS'] = flags


def compilation_cache_dir() -> str:
  """Where compiled programs persist between runs; '' turns it off.

  $JAXLAB_COMPILATION_CACHE if set, else `<jaxlab cache>/xla`.
  """
  from jaxlab import pretrained  # pylint: disable=g-import-not-at-top
  return os.environ.get('JAXLAB_COMPILATION_CACHE',
                        os.path.join(pretrained.cache_dir(), 'xla'))


def configure() -> None:
  """Persists compiled programs, so that a resumed run, the next seed of a
  suite or a rerun skips most of its compile time."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = compilation_cache_dir()
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
