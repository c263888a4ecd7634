"""Importing jaxlab changes nothing in the process; the speed defaults are
applied by one call, and yield to what the user set."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Imports, first, the libraries jaxlab's modules import at their top (some,
# TensorFlow's above all, set variables of their own on import), then
# jaxlab's modules and the configs: what changes then is jaxlab's doing.
_IMPORT_EVERYTHING = r'''
import ast, glob, importlib, json, os, pkgutil, sys
sys.path.insert(0, ROOT)
libraries = set()
for path in glob.glob(os.path.join(ROOT, 'jaxlab', '*.py')):
  for node in ast.parse(open(path).read()).body:
    if isinstance(node, ast.Import):
      libraries.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      libraries.add(node.module)
      # `from clu import metric_writers` imports a module of its own.
      libraries.update(f'{node.module}.{a.name}' for a in node.names)
for name in sorted(l for l in libraries if not l.startswith('jaxlab')):
  try:
    importlib.import_module(name)
  except ImportError:  # A name, not a module: imported with its module.
    pass
import jax
before = (dict(os.environ), dict(jax.config.values))
import jaxlab
modules = [m.name for m in pkgutil.walk_packages(jaxlab.__path__, 'jaxlab.')]
modules += ['configs.' + os.path.basename(p)[:-3] for p in
            glob.glob(os.path.join(ROOT, 'configs', '*.py'))]
for name in modules:
  importlib.import_module(name)
after = (dict(os.environ), dict(jax.config.values))
changed = {k for k in set(before[0]) | set(after[0])
           if before[0].get(k) != after[0].get(k)}
config = {k for k in before[1] if str(before[1][k]) != str(after[1].get(k))}
print(json.dumps({'modules': len(modules), 'environ': sorted(changed),
                  'jax_config': sorted(config)}))
'''


def test_importing_jaxlab_and_every_module_changes_no_environment():
  env = {k: v for k, v in os.environ.items()
         if k != 'XLA_FLAGS' and not k.startswith('MALLOC_')}
  proc = subprocess.run(
      [sys.executable, '-c', f'ROOT = {ROOT!r}\n' + _IMPORT_EVERYTHING],
      env=env, capture_output=True, text=True, timeout=300, check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['modules'] > 20
  assert result['environ'] == [] and result['jax_config'] == [], result


def test_malloc_defaults_yield_to_the_environment(monkeypatch):
  from jaxlab import runtime
  monkeypatch.setenv('MALLOC_ARENA_MAX', '4')
  applied = runtime.apply_malloc_defaults()
  if applied:  # glibc
    assert applied == {'mmap_max': 0, 'trim_threshold': -1,
                       'top_pad': 256 << 20}
  monkeypatch.delenv('MALLOC_ARENA_MAX')
  assert 'arena_max' in runtime.apply_malloc_defaults() or not applied


def test_xla_defaults_yield_to_the_user(monkeypatch):
  from jaxlab import runtime
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  runtime.apply_xla_defaults()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_force_host_platform_device_count=2 '
      '--xla_cpu_experimental_ynn_fusion_type= '
      '--xla_cpu_copy_insertion_use_region_analysis=true')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  runtime.apply_xla_defaults()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_cpu_experimental_ynn_fusion_type=dot '
      '--xla_cpu_copy_insertion_use_region_analysis=true')


_FREE_AND_RELEASE = r'''
import sys
sys.path.insert(0, ROOT)
import numpy as np
from jaxlab import runtime
def rss():
  for line in open('/proc/self/status'):
    if line.startswith('VmRSS'):
      return int(line.split()[1]) // 1024
runtime.apply_malloc_defaults()  # The heap keeps what is freed...
kept = np.ones(8 << 20)  # 64 MiB still in use, above the freed memory.
freed = np.ones(32 << 20)  # 256 MiB, in the heap (no mmap).
keep_top = np.ones(1 << 10)
del freed
before = rss()
released = runtime.release_free_memory()  # ...until it is released.
print(released, before, rss(), kept.sum() > 0, keep_top.sum() > 0)
'''


def test_release_free_memory_hands_the_heaps_free_pages_back():
  if not os.path.exists('/proc/self/status'):
    pytest.skip('reads the resident size from Linux /proc')
  proc = subprocess.run(
      [sys.executable, '-c', f'ROOT = {ROOT!r}\n' + _FREE_AND_RELEASE],
      capture_output=True, text=True, timeout=120, check=True,
      env={k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')})
  released, before, after, *_ = proc.stdout.split()
  if released != 'True':
    pytest.skip('not glibc: malloc is not tuned, nothing to release')
  assert int(before) - int(after) > 200, proc.stdout


def test_jax_defaults_yield_to_the_environment(monkeypatch):
  import jax
  from jaxlab import errors, runtime
  before = jax.config.values['jax_cpu_enable_async_dispatch']
  try:
    monkeypatch.setenv('JAX_CPU_ENABLE_ASYNC_DISPATCH', 'true')
    assert runtime.apply_jax_defaults() == {
        'jax_cpu_enable_async_dispatch': True}
    monkeypatch.delenv('JAX_CPU_ENABLE_ASYNC_DISPATCH')
    assert runtime.apply_jax_defaults() == {
        'jax_cpu_enable_async_dispatch': False}
    monkeypatch.setenv('JAX_CPU_ENABLE_ASYNC_DISPATCH', 'sometimes')
    with pytest.raises(errors.UserError, match='JAX_CPU_ENABLE_ASYNC_DISPATCH'):
      runtime.apply_jax_defaults()
  finally:
    jax.config.update('jax_cpu_enable_async_dispatch', before)


# Steps as the train loop runs them (the next dispatched before the previous
# one's outputs are read), each with 256 MiB of temporaries (the matmul's
# result and its cumulative sums). What matters is that each step's are
# freed by the time the next step allocates its own: else the heap, which
# keeps what is freed, holds two steps' blocks.
_STEPS = r'''
import ctypes, sys
sys.path.insert(0, ROOT)
from jaxlab import runtime
runtime.apply_defaults()
import jax, jax.numpy as jnp
class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks '
      'keepcost').split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
def in_use_mib():
  return libc.mallinfo2().uordblks >> 20
@jax.jit
def step(state, x, w):
  t = jnp.tanh(x @ w)  # 2048 x 16384 float32: 128 MiB.
  return state + jnp.cumsum(t, axis=1)[:, -1].sum(), t[0, 0]
x = jnp.ones((2048, 64)) / 64
w = jnp.ones((64, 16384))
state, previous = step(jnp.zeros(()), x, w)
float(previous)
in_use = [in_use_mib()]
for _ in range(12):
  state, out = step(state, x, w)
  float(previous)
  previous = out
  in_use.append(in_use_mib())
print(*in_use)
'''


def test_each_steps_temporaries_are_freed_before_the_next_step():
  probe = subprocess.run([sys.executable, '-c',
                          'import ctypes; ctypes.CDLL(None).mallinfo2'],
                         capture_output=True, check=False)
  if probe.returncode:
    pytest.skip('reads the heap in use with glibc\'s mallinfo2')
  proc = subprocess.run(
      [sys.executable, '-c', f'ROOT = {ROOT!r}\n' + _STEPS],
      capture_output=True, text=True, timeout=120, check=True,
      env={k: v for k, v in os.environ.items()
           if not k.startswith(('MALLOC_', 'JAX_CPU_'))})
  first, *later = map(int, proc.stdout.split())
  assert max(later) - first < 64, proc.stdout  # No step's 256 MiB left.
