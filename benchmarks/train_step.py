"""Train-step throughput: jaxlab against PyTorch on the same machine.

  python benchmarks/train_step.py                      # every model
  python benchmarks/train_step.py --models cnn2,fc --repeats 7
  python benchmarks/train_step.py --torch-compile      # PyTorch compiled too
  python benchmarks/train_step.py --pipeline           # the input pipeline too
  python benchmarks/train_step.py --jax-only --half-precision \
      --models vgg16 --batch 256                       # a GPU

For each model, one worker process runs jaxlab's own train step (the
pmapped `jaxlab.steps.train_step` that launch.py uses) and others the same
model and step in PyTorch: eager (all cores, glibc malloc tuned to keep
large buffers), eager in the channels-last memory format (models with
convolutions) and, with --torch-compile, under torch.compile. The parent
gives them turns, in rotation, so that the machine's noise hits all alike:
each turn runs --steps-per-turn steps (default 2) and times the last, since
the first step after another worker's turn runs slower. Medians after
warm-up. Batches are synthetic uint8 images, as the input pipeline
delivers them; nothing here imports TensorFlow. The table:

  model, batch, jaxlab img/s, PyTorch img/s (eager / channels-last /
  compiled), ratio (jaxlab / the fastest PyTorch), GFLOP/s (jaxlab, FLOPs
  of the step from XLA's cost analysis, convolutions included), % of peak
  (the matmul peak measured here, in float32, or bfloat16 with
  --half-precision; measured again before each model, the best so far),
  compile s (jaxlab, ahead of time), peak MiB (jaxlab's peak device memory
  on an accelerator; on a CPU, each worker's max RSS growth). On a GPU
  whose datasheet peak is known (DATASHEET_TFLOPS), the table is followed
  by each model's FLOP utilisation against that peak.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (jaxlab model config, batch, image size, channels, frozen patterns)
MODELS = {
    'fc': ({'name': 'fc'}, 64, 180, 4, ()),
    'cnn2': ({'name': 'cnn2'}, 64, 180, 4, ()),
    'cnn_bn': ({'name': 'cnn_bn'}, 64, 180, 4, ()),
    'scratch_cnn': ({'name': 'scratch_cnn'}, 32, 224, 3, ()),
    'vgg16': ({'name': 'vgg16'}, 8, 224, 3, ()),
    'vgg16_frozen': ({'name': 'vgg16'}, 8, 224, 3, ('features',)),
}
NUM_CLASSES = 15
# PyTorch eager is fastest here when glibc keeps large buffers instead of
# returning them to the OS after every step.
TORCH_MALLOC = {'MALLOC_MMAP_THRESHOLD_': str(1 << 32),
                'MALLOC_TRIM_THRESHOLD_': str(1 << 32)}


# Dense bfloat16 peaks from the vendors' datasheets, in TFLOP/s, for model
# FLOP utilisation against the hardware rather than a measured matmul.
# Longest matching prefix of jax's device_kind wins.
DATASHEET_TFLOPS = {
    'NVIDIA H100': {'bfloat16': 989.4},  # SXM: 'NVIDIA H100 80GB HBM3'.
    'NVIDIA H100 PCIe': {'bfloat16': 756.0},
    'NVIDIA H100 NVL': {'bfloat16': 835.5},
    'NVIDIA H200': {'bfloat16': 989.4},
    'NVIDIA H200 NVL': {'bfloat16': 835.5},
    'NVIDIA A100': {'bfloat16': 312.0},
}


def datasheet_tflops(device_kind: str, dtype: str) -> float | None:
  """The datasheet peak of `device_kind` in `dtype`, if DATASHEET_TFLOPS
  knows it."""
  matches = [k for k in DATASHEET_TFLOPS if device_kind.startswith(k)]
  if not matches:
    return None
  return DATASHEET_TFLOPS[max(matches, key=len)].get(dtype)


def _max_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mib(framework: str, rss_before: float) -> float:
  """JAX's peak device memory where the device reports it (accelerators),
  else the process's max RSS growth."""
  if framework == 'jax':
    import jax  # pylint: disable=g-import-not-at-top
    stats = jax.local_devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      return stats['peak_bytes_in_use'] / 2**20
  return _max_rss_mib() - rss_before


def _batch(batch, size, channels):
  rng = np.random.default_rng(0)
  return (rng.integers(0, 255, (batch, size, size, channels), dtype=np.uint8),
          rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32))


def _step_flops(preprocess, state, device_batch) -> float:
  """FLOPs of one device's train step, from XLA's cost analysis of the step
  traced with XLA's own convolutions: XLA counts none inside oneDNN's."""
  from jaxlab import steps  # pylint: disable=g-import-not-at-top
  with mock.patch.dict(os.environ, {'JAXLAB_ONEDNN': '0'}):
    p_train, _ = steps.pmapped_steps(preprocess)
    cost = p_train.lower(state, device_batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def jax_worker(name: str, batch: int, half_precision: bool = False):
  """Builds jaxlab's step; returns a function running one step, and facts."""
  from jaxlab import runtime  # pylint: disable=g-import-not-at-top
  runtime.apply_defaults()  # Before JAX starts, as launch.py.
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxlab import models, steps  # pylint: disable=g-import-not-at-top
  from jaxlab.preprocessing import Preprocess  # pylint: disable=g-import-not-at-top
  model_cfg, _, size, channels, frozen = MODELS[name]
  model = models.create_model(
      ml_collections.ConfigDict(model_cfg), NUM_CLASSES, axis_name=steps.AXIS,
      dtype=models.compute_dtype(half_precision))
  optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.001, momentum=0.9, grad_clip_norm=0.0,
      frozen=frozen))
  state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(0),
                                   (size, size, channels))
  state = steps.replicate(state)
  preprocess = Preprocess()
  p_train, _ = steps.pmapped_steps(preprocess)
  n_dev = jax.local_device_count()
  if batch % n_dev:
    raise SystemExit(f'error: batch {batch} does not split over {n_dev} '
                     'devices; pass --batch with a multiple of it')
  images, labels = _batch(batch, size, channels)
  device_batch = jax.device_put(
      {'image': images.reshape((n_dev, -1) + images.shape[1:]),
       'label': labels.reshape(n_dev, -1)})
  flops = _step_flops(preprocess, state, device_batch) * n_dev
  start = time.perf_counter()
  compiled = p_train.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start
  runtime.release_free_memory()  # As launch.py's training does here.
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], device_batch)
    jax.block_until_ready((holder['state'], metrics))

  return step, {'compile_s': compile_s, 'flops': flops, 'batch': batch,
                'device': jax.devices()[0].device_kind}


def torch_worker(name: str, batch: int, use_compile: bool,
                 half_precision: bool = False, channels_last: bool = False):
  """The same model and SGD step in PyTorch; returns a one-step function.

  With `channels_last`, the model's and the images' memory format is
  channels-last, in which oneDNN runs convolutions on wide images faster
  (cnn_bn's 16-channel layer at 180 x 180: 249 against 555 ms).

  Like jaxlab's step, it computes the step's loss, accuracy and gradient
  norm (the metrics jaxlab logs), not the loss alone.

  With `half_precision`, the forward pass and loss run under
  `torch.autocast(bfloat16)`, PyTorch's counterpart of jaxlab's
  half_precision (float32 parameters and optimizer state).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model_cfg, _, size, channels, frozen = MODELS[name]
  kind = model_cfg['name']
  if kind == 'fc':
    model = torch_models.fc(NUM_CLASSES, size * size * channels)
  elif kind == 'vgg16':
    model = torch_models.TorchVGG16(NUM_CLASSES)
    if frozen:
      model.features.requires_grad_(False)
  else:
    model = getattr(torch_models, kind)(NUM_CLASSES, channels, size)
  model.train()
  memory_format = (torch.channels_last if channels_last else
                   torch.contiguous_format)
  model = model.to(memory_format=memory_format)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
  images, labels = _batch(batch, size, channels)
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(
      memory_format=memory_format)
  labels = torch.from_numpy(labels).long()

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=half_precision):
      logits = model(images.float() / 255)
      loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    # The metrics jaxlab's step returns: loss, accuracy, gradient norm.
    accuracy = (logits.argmax(-1) == labels).float().mean()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    return loss.detach(), accuracy, grad_norm

  start = time.perf_counter()
  step = torch.compile(train_step) if use_compile else train_step
  step()
  return step, {'compile_s': time.perf_counter() - start if use_compile
                else 0.0, 'batch': batch}


def serve(framework: str, name: str, batch: int, half_precision: bool) -> None:
  """Worker loop: set up, report, then run one timed step per request."""
  rss_before = _max_rss_mib()
  if framework == 'jax':
    step, info = jax_worker(name, batch, half_precision)
  else:
    step, info = torch_worker(name, batch, framework == 'torch_compile',
                              half_precision,
                              framework == 'torch_channels_last')
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    if line.strip() == 'quit':
      break
    # `step N`: N steps, the last one timed. The first step after another
    # worker's turn runs slower (caches, memory), so N = 2 measures the
    # steady state while still interleaving the workers.
    for _ in range(int(line.split()[1]) - 1):
      step()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    print(json.dumps({'seconds': seconds,
                      'peak_mib': _peak_mib(framework, rss_before)}),
          flush=True)


class Worker:

  def __init__(self, framework, name, args, env):
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', framework,
           '--models', name, '--batch', str(_batch_size(name, args))]
    cmd += ['--half-precision'] if args.half_precision else []
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env,
                                 cwd=ROOT)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'worker {self.proc.args} died')
    return json.loads(line)

  def step(self, count: int = 1):
    self.proc.stdin.write(f'step {count}\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.write('quit\n')
    self.proc.stdin.flush()
    self.proc.wait()


def _batch_size(name, args) -> int:
  return args.batch or MODELS[name][1]


def matmul_peak_gflops(dtype: str = 'float32', with_torch: bool = True,
                       n: int = 2048, repeats: int = 5) -> float:
  """The best matmul rate of JAX (and PyTorch) here, in GFLOP/s.

  PyTorch's CPU matmuls run through oneDNN (AMX or AVX512-BF16 kernels in
  bfloat16 where the CPU has them), XLA's bfloat16 dot does not: in
  bfloat16 the machine's peak is PyTorch's.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    n = 8192  # Enough work to fill an accelerator.
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  candidates = [lambda: matmul(a).block_until_ready()]
  if with_torch and importlib.util.find_spec('torch'):
    import torch  # pylint: disable=g-import-not-at-top
    t = torch.ones(n, n, dtype=getattr(torch, dtype))
    candidates.append(lambda: t @ t)
  rates = []
  for _ in range(repeats):
    for run in candidates:
      start = time.perf_counter()
      run()
      rates.append(2 * n ** 3 / (time.perf_counter() - start))
  return max(rates) / 1e9


def cpu_isa() -> str:
  """The instruction set oneDNN finds here (jaxlab's oneDNN), or '-'."""
  from jaxlab import onednn  # pylint: disable=g-import-not-at-top
  return onednn.cpu_isa() if onednn.available() else '-'


def benchmark_model(name, args):
  """Interleaved turns of jaxlab and each PyTorch variant; medians."""
  env = dict(os.environ)
  frameworks = ['jax']
  if not args.jax_only:
    frameworks.append('torch')
    if MODELS[name][0]['name'] != 'fc':  # Convolutions: both layouts.
      frameworks.append('torch_channels_last')
    if args.torch_compile:
      frameworks.append('torch_compile')
  workers = {f: Worker(f, name, args,
                       env if f == 'jax' else {**env, **TORCH_MALLOC})
             for f in frameworks}
  times = {f: [] for f in frameworks}
  peaks = {f: 0.0 for f in frameworks}
  for i in range(args.warmup + args.repeats):
    for framework, worker in workers.items():
      out = worker.step(args.steps_per_turn)
      peaks[framework] = max(peaks[framework], out['peak_mib'])
      if i >= args.warmup:
        times[framework].append(out['seconds'])
  for worker in workers.values():
    worker.close()
  info = workers['jax'].info
  batch = info['batch']
  seconds = {f: float(np.median(t)) for f, t in times.items()}
  torch_s = min((seconds[f] for f in frameworks[1:]), default=float('nan'))
  return {'model': name, 'batch': batch, 'jax_img_s': batch / seconds['jax'],
          'torch_img_s': {f: batch / seconds[f] for f in frameworks[1:]},
          'ratio': torch_s / seconds['jax'],
          'gflop_s': info['flops'] / seconds['jax'] / 1e9,
          'compile_s': info['compile_s'], 'device': info['device'],
          'peak_mib': peaks}


def input_pipeline_rate(num_images: int = 512) -> dict:
  """Images/s streamed from a folder of 500 x 375 JPEGs (decoded, resized
  to 224 and batched by jaxlab's loader, as `data.cache=stream` trains), and
  decoded into memory (`data.cache=memory`)."""
  from jaxlab import runtime  # pylint: disable=g-import-not-at-top
  runtime.apply_defaults()  # malloc's, as launch.py's pipeline runs with.
  from benchmarks import input_pipeline as bench  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxlab import input_pipeline  # pylint: disable=g-import-not-at-top
  from jaxlab import loader  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as root:
    bench.make_jpegs(root, num_images)
    stream = bench.jaxlab_rate(root, 224, 32, loader.cpu_count(), 0)
    config = default.get_config().data
    config.update(path=root, image_size=224, channels=3, cache='memory')
    start = time.perf_counter()
    input_pipeline.load_dataset(config)
    memory = num_images / (time.perf_counter() - start)
  return {'stream_img_s': stream, 'decode_into_memory_img_s': memory}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--torch-compile', action='store_true',
                      help='also time PyTorch under torch.compile; the ratio '
                      'is against the faster of eager and compiled')
  parser.add_argument('--jax-only', action='store_true',
                      help='no PyTorch (e.g. on a GPU)')
  parser.add_argument('--half-precision', action='store_true',
                      help="jaxlab's half_precision: bfloat16 computation "
                      '(PyTorch under torch.autocast); the peak is then the '
                      'bfloat16 matmul peak')
  parser.add_argument('--batch', type=int, default=0,
                      help="global batch (default: each model's own)")
  parser.add_argument('--steps-per-turn', type=int, default=2,
                      help='steps each framework runs per turn; the last is '
                      'timed')
  parser.add_argument('--pipeline', action='store_true')
  parser.add_argument('--worker', choices=('jax', 'torch',
                                          'torch_channels_last',
                                          'torch_compile'))
  args = parser.parse_args()
  if args.worker:
    serve(args.worker, args.models, args.batch, args.half_precision)
    return
  dtype = 'bfloat16' if args.half_precision else 'float32'
  import jax  # pylint: disable=g-import-not-at-top
  on_cpu = jax.default_backend() == 'cpu'
  measure_peak = lambda: matmul_peak_gflops(dtype, with_torch=on_cpu and (
      not args.jax_only or args.half_precision))
  peak = measure_peak()
  isa = f'; oneDNN ISA: {cpu_isa()}' if on_cpu else ''
  print(f'{dtype} matmul peak (measured): {peak:.1f} GFLOP/s{isa}')
  header = ('model', 'batch', 'jaxlab img/s', 'PyTorch img/s', 'ratio',
            'GFLOP/s', '% of peak', 'compile s', 'peak MiB')
  print(' | '.join(header))
  rows = []
  for i, name in enumerate(args.models.split(',')):
    if i:  # The machine's speed drifts: the best peak seen so far.
      peak = max(peak, measure_peak())
    r = benchmark_model(name, args)
    rows.append(r)
    torch_rates = ' / '.join(f'{v:.2f}' for v in r['torch_img_s'].values())
    peaks = '/'.join(f'{v:.0f}' for v in r['peak_mib'].values())
    print(f'{r["model"]} | {r["batch"]} | {r["jax_img_s"]:.2f} | '
          f'{torch_rates or "-"} | {r["ratio"]:.2f} | {r["gflop_s"]:.1f} | '
          f'{100 * r["gflop_s"] / peak:.0f} | {r["compile_s"]:.1f} | {peaks}',
          flush=True)
  device = rows[0]['device'] if rows else '-'
  print(f'{dtype} matmul peak, the best measured before each model: '
        f'{peak:.1f} GFLOP/s')
  if args.jax_only:
    print(f'device: {device}; peak MiB: jax')
  else:
    compiled = ' / torch.compile' if args.torch_compile else ''
    print(f'device: {device}; PyTorch img/s: eager / eager channels-last '
          f'(convolutional models){compiled}; peak MiB: jax/torch '
          f'eager/channels-last{compiled.replace(" / ", "/")}')
  datasheet = datasheet_tflops(device, dtype)
  if datasheet:
    print(f'model FLOP utilisation against the {device} datasheet {dtype} '
          f'peak ({datasheet:.0f} TFLOP/s): ' + ', '.join(
              f'{r["model"]} {r["gflop_s"] / datasheet / 10:.1f} %'
              for r in rows))
  if args.pipeline:
    rates = input_pipeline_rate()
    print(f'input pipeline: {rates["stream_img_s"]:.0f} img/s streamed '
          '(500 x 375 JPEGs decoded, resized to 224 x 224 and batched), '
          f'{rates["decode_into_memory_img_s"]:.0f} img/s decoded into memory')
    for r in rows:
      print(f'  {r["model"]} consumes {r["jax_img_s"]:.1f} img/s: streaming '
            f'is {rates["stream_img_s"] / r["jax_img_s"]:.1f}x that')


if __name__ == '__main__':
  main()
