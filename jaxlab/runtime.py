"""Process-wide settings that every entry point applies first.

Importing jaxlab applies none of them: entry points (launch.py, the
benchmark) call `apply_defaults()` first thing, and a program that uses
jaxlab as a library does the same to get them:

    from jaxlab import runtime
    runtime.apply_defaults()   # before JAX computes anything
    import jax

XLA reads XLA_FLAGS once, when its first backend starts, JAX its CPU
client's options too, and glibc gives each thread its malloc arena when the
thread first allocates, so they must come before JAX starts. Flags and
variables the user set win.
"""

import ctypes
import ctypes.util
import os

# XLA flags that make training faster on CPU, measured with
# benchmarks/train_step.py. Flags already in XLA_FLAGS win.
XLA_DEFAULTS = {
    # XLA:CPU's YNNPACK fusions run this project's convolutions several
    # times slower than its other path (cnn2's train step: about 5x).
    'xla_cpu_experimental_ynn_fusion_type': '',
    # Without it, XLA:CPU copies every parameter that the input gradient
    # reads before the in-place update overwrites it (all of VGG16's
    # weights, every step), and the copies run beside the first
    # convolutions, slowing them down. Region analysis orders the update
    # after those reads instead (a control dependency).
    'xla_cpu_copy_insertion_use_region_analysis': 'true',
}


# glibc malloc settings for large, short-lived buffers. XLA:CPU allocates
# every step's temporaries and outputs with malloc from its worker threads;
# glibc serves those from per-thread arenas, whose large blocks are fresh
# mmaps, returned to the OS on free. Every step then page-faults its whole
# working set back in. One arena, no mmap and no trimming keep freed memory
# for the next step. Cost: the process keeps its peak heap resident. The
# heap grows with 256 MiB to spare (address space, resident only once
# used), so that small blocks allocated during a step split the hole the
# step's largest buffer left less often; the step's block of temporaries
# is reused from one step to the next where steps run inline (JAX_DEFAULTS).
# The environment's MALLOC_* variables win.
MALLOC_DEFAULTS = {
    # name: (mallopt parameter, environment variable, value)
    'arena_max': (-8, 'MALLOC_ARENA_MAX', 1),
    'mmap_max': (-4, 'MALLOC_MMAP_MAX_', 0),
    'trim_threshold': (-1, 'MALLOC_TRIM_THRESHOLD_', -1),  # -1: never.
    'top_pad': (-2, 'MALLOC_TOP_PAD_', 256 << 20),
}


def apply_malloc_defaults() -> dict:
  """Applies MALLOC_DEFAULTS with mallopt (glibc only; elsewhere a no-op).

  Returns the settings applied, by name.
  """
  libc = _glibc()
  if libc is None:
    return {}  # Not glibc (musl, macOS): nothing to tune.
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  applied = {}
  for name, (param, env, value) in MALLOC_DEFAULTS.items():
    if env not in os.environ and mallopt(param, value) == 1:
      applied[name] = value
  return applied


def _glibc():
  """glibc, or None (musl, macOS)."""
  path = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(path)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    libc.mallopt  # pylint: disable=pointless-statement
    libc.malloc_trim  # pylint: disable=pointless-statement
  except (OSError, AttributeError, TypeError):
    return None
  return libc


def release_free_memory() -> bool:
  """Hands the heap's free pages back to the OS (glibc's malloc_trim), once
  the one-off work before training is done.

  With MALLOC_DEFAULTS the heap never shrinks, so what initialising the
  parameters (VGG16's at XLA's -O0: temporaries the size of every kernel,
  several times over), restoring a checkpoint and compiling left free would
  stay resident beside the train step's own buffers, which reuse little of
  it: VGG16's peak RSS was 1.4x the step's needs. A no-op elsewhere than
  glibc. Returns whether it ran.
  """
  libc = _glibc()
  if libc is None:
    return False
  libc.malloc_trim(0)
  return True


# JAX options, set with jax.config before the CPU backend starts. JAX reads
# no environment variable for them; jaxlab takes `$NAME_IN_CAPITALS` (true /
# false) where the user set it.
JAX_DEFAULTS = {
    # Each step on the Python thread, not dispatched to XLA:CPU's workers.
    # Asynchronously, the next step starts when the previous one's outputs
    # are ready, and XLA:CPU frees that step's temporaries only after this:
    # two steps' blocks of temporaries were allocated at once, and with
    # MALLOC_DEFAULTS the heap kept both (cnn2: 1,373 MiB more resident,
    # 3.3 instead of 1.9 GiB). Inline, a step's temporaries are freed before
    # it returns. Steps ran no slower (benchmarks/README.md, Memory).
    'jax_cpu_enable_async_dispatch': False,
}


def apply_defaults() -> None:
  """XLA flags, malloc settings and JAX options (see XLA_DEFAULTS,
  MALLOC_DEFAULTS and JAX_DEFAULTS), for this process and the processes it
  starts, where the user has not set them. Imports JAX; call it before JAX
  computes anything."""
  apply_xla_defaults()
  apply_malloc_defaults()
  apply_jax_defaults()


def apply_jax_defaults() -> dict:
  """Sets JAX_DEFAULTS with jax.config, each unless `$NAME` (capitals) gives
  another value; returns the options set, by name."""
  import jax  # pylint: disable=g-import-not-at-top
  applied = {}
  for name, value in JAX_DEFAULTS.items():
    given = os.environ.get(name.upper())
    if given is not None:
      value = _boolean(name.upper(), given)
    jax.config.update(name, value)
    applied[name] = value
  return applied


def _boolean(variable: str, text: str) -> bool:
  from jaxlab.errors import UserError  # pylint: disable=g-import-not-at-top
  if text.lower() in ('1', 'true', 'yes', 'on'):
    return True
  if text.lower() in ('0', 'false', 'no', 'off'):
    return False
  raise UserError(f'${variable}={text!r} is not a boolean: give true or false')


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
