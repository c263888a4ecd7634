"""Process-wide JAX settings that every entry point applies first."""

import os

import jax

from jaxlab import pretrained


def compilation_cache_dir() -> str:
  """Where compiled programs persist between runs; '' turns it off.

  $JAXLAB_COMPILATION_CACHE if set, else `<jaxlab cache>/xla`.
  """
  return os.environ.get('JAXLAB_COMPILATION_CACHE',
                        os.path.join(pretrained.cache_dir(), 'xla'))


def configure() -> None:
  """Persists compiled programs, so that a resumed run, the next seed of a
  suite or a rerun skips most of its compile time."""
  cache = compilation_cache_dir()
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
