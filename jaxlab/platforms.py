"""The one place where each backend's program is chosen: when it is lowered.

`per_platform(fn)` traces `fn` twice and stages both out with
`jax.lax.platform_dependent`: once as the XLA:CPU program, in which
`jaxlab.layers` and `jaxlab.optimizers` use their CPU implementations
(oneDNN calls, stored intermediates, staged reductions: `jaxlab.ops`), and
once as the plain flax/optax program. Lowering for CPU keeps the first;
lowering for `cuda`, `rocm` or `tpu` keeps the second, so an accelerator's
program holds no CPU-only construct, whichever machine traced it.

    step = jax.jit(platforms.per_platform(train_step))

Code outside `per_platform` is traced as the plain program.
"""

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable

import jax


@dataclasses.dataclass
class CpuProgram:
  """What one trace of the XLA:CPU program shares between its layers.

  fusable_relu: {id(y): (y, fused)} for layer outputs y (BatchNorm's in
    training, a convolution's) whose ReLU `fused()` computes together with
    y's own work; `jaxlab.layers.relu` looks its input up here.
  fusable_max_pool: {id(y): (y, fused)} for ReLU outputs y whose max-pool
    `fused(k, stride, padding)` computes together with y's own work;
    `jaxlab.layers.max_pool` looks its input up here.
  """
  fusable_relu: dict[int, tuple[Any, Callable[[], Any]]] = dataclasses.field(
      default_factory=dict)
  fusable_max_pool: dict[int, tuple[Any, Callable[..., Any]]] = (
      dataclasses.field(default_factory=dict))


_program: contextvars.ContextVar[CpuProgram | None] = contextvars.ContextVar(
    'jaxlab_cpu_program', default=None)


def cpu_program() -> CpuProgram | None:
  """The XLA:CPU program being traced, or None when tracing the plain one."""
  return _program.get()


@contextlib.contextmanager
def tracing_cpu_program(cpu: bool = True):
  """Traces what runs inside as the XLA:CPU program (or, with `cpu=False`,
  as the plain one). For tests and `per_platform`; a program traced this
  way runs on CPU only."""
  token = _program.set(CpuProgram() if cpu else None)
  try:
    yield
  finally:
    _program.reset(token)


def _traced_as(cpu: bool, fn: Callable, *args):
  with tracing_cpu_program(cpu):
    return fn(*args)


def per_platform(fn: Callable) -> Callable:
  """`fn`, lowered as the XLA:CPU program on CPU and as the plain program on
  every other platform (see the module docstring). `fn` takes and returns
  pytrees of arrays; bind static arguments with `functools.partial` first."""

  @functools.wraps(fn)
  def lowered_per_platform(*args):
    return jax.lax.platform_dependent(
        *args, cpu=functools.partial(_traced_as, True, fn),
        default=functools.partial(_traced_as, False, fn))

  return lowered_per_platform
