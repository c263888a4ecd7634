"""Shared helpers: tiny image folders, launch.py in a subprocess, and
functions' outputs with their gradients."""

import os
import signal
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs` and `jaxlab` import from the repo root.

from jaxlab import runtime  # pylint: disable=wrong-import-position

# The tests run under the speed defaults, as launch.py: before JAX starts.
runtime.apply_defaults()

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compiled programs are shared between this session's launches, not with
# earlier sessions or the user's cache.
os.environ['JAXLAB_COMPILATION_CACHE'] = tempfile.mkdtemp(prefix='jaxlab_xla_')


def write_images(folder: str, count: int, label: int, size=(20, 16),
                 mode: str = 'RGBA', ext: str = 'png', seed: int = 0) -> None:
  """`count` random images whose mean colour depends on `label`."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng([seed, label])
  channels = len(mode)
  for i in range(count):
    base = (label * 70) % 256
    pixels = np.clip(rng.normal(base, 40, (size[1], size[0], channels)), 0,
                     255).astype(np.uint8)
    if mode == 'L':
      pixels = pixels[..., 0]
    Image.fromarray(pixels, mode).save(
        os.path.join(folder, f'img{i:03d}.{ext}'))


def make_image_folder(root: str, num_classes: int = 3, per_class: int = 10,
                      presplit: bool = False, **kwargs) -> str:
  """An image folder: class sub-folders, or train/ and test/ of them."""
  for c in range(num_classes):
    if presplit:
      write_images(os.path.join(root, 'train', f'class{c}'), per_class, c,
                   **kwargs)
      write_images(os.path.join(root, 'test', f'class{c}'),
                   max(2, per_class // 3), c, seed=1, **kwargs)
    else:
      write_images(os.path.join(root, f'class{c}'), per_class, c, **kwargs)
  return root


def outputs_and_grads(f, cotangent, *args):
  """f(*args) and the gradients of <f(*args), cotangent> by each of args."""
  out, vjp = jax.vjp(f, *args)
  return (out, *vjp(cotangent))


def train_checking_freezing(state, batch, trace_of, num_steps: int = 2):
  """Trains `state` for `num_steps` pmapped steps on `batch` and checks what
  freezing promises: frozen parameters keep their values, every other one
  changes, and only trainable ones have momentum (the optimizer's trace,
  `trace_of(opt_state)`). Returns the final state."""
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxlab import steps  # pylint: disable=g-import-not-at-top
  from jaxlab.preprocessing import Preprocess  # pylint: disable=g-import-not-at-top
  start = flax.traverse_util.flatten_dict(jax.device_get(state.params))
  p_train, _ = steps.pmapped_steps(Preprocess())
  replicated = steps.replicate(state)
  for _ in range(num_steps):
    replicated, _ = p_train(replicated, batch)
  final = steps.unreplicate(replicated)
  end = flax.traverse_util.flatten_dict(jax.device_get(final.params))
  for path in start:
    if path in state.frozen:
      np.testing.assert_array_equal(end[path], start[path], err_msg=str(path))
    else:
      assert not np.array_equal(end[path], start[path]), path
  for path, leaf in flax.traverse_util.flatten_dict(
      trace_of(final.opt_state),
      is_leaf=lambda _, x: isinstance(x, optax.MaskedNode)).items():
    assert isinstance(leaf, optax.MaskedNode) == (path in state.frozen), path
  return final


def _launch_env(devices: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _check_exit(args, returncode: int, stderr: str) -> None:
  if returncode != 0:
    raise AssertionError(f'launch.py {" ".join(args)} failed '
                         f'({returncode}):\n{stderr[-4000:]}')


def run_launch(*args: str, devices: int = 1, timeout: int = 300,
               check: bool = True, cwd: str = ROOT
               ) -> subprocess.CompletedProcess:
  """Runs launch.py with `devices` fake CPU devices, from `cwd`; returns the
  process."""
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=cwd,
      env=_launch_env(devices), capture_output=True, text=True,
      timeout=timeout)
  if check:
    _check_exit(args, proc.returncode, proc.stderr)
  return proc


def start_launch_distributed(*args: str, processes: int,
                             devices: int) -> list:
  """Starts launch.py --distributed as `processes` processes on this
  machine, each with `devices` fake CPU devices; returns (argv, Popen)s."""
  with socket.socket() as s:  # A free port for the coordinator.
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(processes):
    argv = [*args, '--distributed', f'--coordinator_address=localhost:{port}',
            f'--num_processes={processes}', f'--process_id={i}']
    procs.append((argv, subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'launch.py'), *argv], cwd=ROOT,
        env=_launch_env(devices), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True)))
  return procs


def run_launch_distributed(*args: str, processes: int, devices: int,
                           timeout: int = 300, check: bool = True
                           ) -> list[str]:
  """Runs launch.py --distributed as `processes` processes on this machine,
  each with `devices` fake CPU devices; returns their stderr."""
  return finish_launch_distributed(
      start_launch_distributed(*args, processes=processes, devices=devices),
      timeout, check)


def finish_launch_distributed(procs: list, timeout: int = 300,
                              check: bool = True) -> list[str]:
  """Waits for `start_launch_distributed`'s processes; their stderr."""
  try:
    errs = [p.communicate(timeout=timeout)[1] for _, p in procs]
  finally:
    for _, p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  if check:
    for (argv, p), err in zip(procs, errs):
      _check_exit(argv, p.returncode, err)
  return errs


@pytest.fixture
def tiny_folder(tmp_path):
  return make_image_folder(str(tmp_path / 'images'), num_classes=3,
                           per_class=12)


class SmallDisk:
  """A tmpfs of `size` bytes, mounted in a mount namespace of its own that a
  sleeping process holds: nothing outside sees it, and it is gone with that
  process. `path` reaches it from this process and its children (through
  /proc/PID/root), so runs write into a disk that really fills up or turns
  read-only, as a user's does."""

  def __init__(self, mountpoint: str, size: int):
    os.makedirs(mountpoint, exist_ok=True)
    try:
      self._holder = subprocess.Popen(
          ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
           'mount -t tmpfs -o size="$1" tmpfs "$0" && echo ready && '
           'exec sleep 3600', mountpoint, str(size)],
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
      pytest.skip('needs unshare(1) for a private tmpfs')
    if self._holder.stdout.readline().strip() != 'ready':
      reason = self._holder.communicate()[1].strip()
      pytest.skip(f'cannot mount a private tmpfs here: {reason}')
    self._mountpoint = mountpoint
    self.path = f'/proc/{self._holder.pid}/root{mountpoint}'

  def free(self) -> int:
    stat = os.statvfs(self.path)
    return stat.f_bavail * stat.f_frsize

  def fill(self, leave: int) -> None:
    """Takes all but `leave` bytes of the free space (give it back with
    `unfill`)."""
    with open(os.path.join(self.path, '.filler'), 'wb') as f:
      os.posix_fallocate(f.fileno(), 0, self.free() - leave)

  def unfill(self) -> None:
    os.remove(os.path.join(self.path, '.filler'))

  def remount(self, options: str) -> None:
    """E.g. 'ro' or 'rw'."""
    subprocess.run(['nsenter', f'--target={self._holder.pid}', '--mount',
                    '--', 'mount', '-o', f'remount,{options}',
                    self._mountpoint], check=True)

  def close(self) -> None:
    self._holder.kill()
    self._holder.wait()


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB disk of its own (see SmallDisk)."""
  disk = SmallDisk(str(tmp_path / 'small_disk'), 4 << 20)
  yield disk
  disk.close()
