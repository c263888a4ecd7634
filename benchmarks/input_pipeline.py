"""Streaming input throughput and memory: jaxlab against PyTorch's DataLoader.

  python benchmarks/input_pipeline.py                  # 2,000 JPEGs
  python benchmarks/input_pipeline.py --folder DIR     # your own folder
  python benchmarks/input_pipeline.py --images 400 --skip-memory

Throughput: images/s decoded from JPEG (about 500 x 375, ImageNet's typical
size, made here unless --folder is given), resized to --size and batched,
from a folder through jaxlab's streaming loader (`data.cache=stream`: PIL in
`data.threads` threads, or `--workers` processes), against what a PyTorch
user runs on the same folder: a `Dataset` that opens each file with PIL,
converts it to RGB, resizes it (bilinear) and makes it a tensor, in a
`DataLoader(num_workers=<cores>)`. They take turns, --repeats each, so the
machine's noise hits both; medians, per core. The files are read once
before, so both read them from the page cache.

Memory: the peak resident memory of `launch.py` training one epoch of the
`scratch` config on the folder, streamed with a memory budget a fraction of
the decoded size, against the same run decoded into memory.
"""

import argparse
import glob
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_jpegs(root: str, count: int, classes: int = 4) -> str:
  """`count` JPEGs of 500 x 375 (quality 90, about 90 KB, as ImageNet's),
  smooth colour waves under noise so that they compress as photos do."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  for i in range(count):
    folder = os.path.join(root, f'class{i % classes}')
    os.makedirs(folder, exist_ok=True)
    f, phase = rng.uniform(0.005, 0.05, 3), rng.uniform(0, 6.3, 3)
    waves = np.stack([127 + 100 * np.sin(xx * f[k] + yy * f[(k + 1) % 3] +
                                         phase[k]) for k in range(3)], -1)
    pixels = np.clip(waves + rng.normal(0, 18, waves.shape), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(
        os.path.join(folder, f'{i:06d}.jpg'), quality=90)
  return root


def _paths(folder: str) -> list[str]:
  return sorted(glob.glob(os.path.join(folder, '*', '*.jp*g')))


def jaxlab_rate(folder: str, size: int, batch: int, threads: int,
                workers: int) -> float:
  """Images/s through jaxlab's streaming loader, one epoch over `folder`."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxlab import input_pipeline  # pylint: disable=g-import-not-at-top
  from jaxlab import loader  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.update(image_size=size, channels=3)
  files = input_pipeline.folder_images(folder, config)  # Every image.
  loading = loader.Loading(threads=threads, workers=workers,
                           skip_bad_images=False)
  sharding = input_pipeline.Sharding(0, 1, 1)
  start, seen = time.perf_counter(), 0
  for b in input_pipeline.train_batches(files, batch, 0, 1, sharding,
                                        loading=loading):
    seen += b['label'].size
  return seen / (time.perf_counter() - start)


def torch_rate(folder: str, size: int, batch: int, workers: int) -> float:
  """Images/s through a PIL `Dataset` in `DataLoader(num_workers=workers)`,
  one epoch, shuffled, as a PyTorch user trains."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  paths = _paths(folder)

  class Files(torch.utils.data.Dataset):

    def __len__(self):
      return len(paths)

    def __getitem__(self, i):
      with Image.open(paths[i]) as image:
        image = image.convert('RGB').resize((size, size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image).copy())
      return pixels.permute(2, 0, 1).float().div(255), i % 4

  data = torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True,
                                     num_workers=workers, drop_last=True)
  start, seen = time.perf_counter(), 0
  for images, _ in data:
    seen += len(images)
  return seen / (time.perf_counter() - start)


def throughput(folder: str, size: int, batch: int, repeats: int,
               workers: int) -> dict:
  """Medians of alternating turns: jaxlab's threads, jaxlab's worker
  processes, PyTorch's DataLoader workers."""
  from jaxlab import loader  # pylint: disable=g-import-not-at-top
  cores = loader.cpu_count()
  for path in _paths(folder):  # Into the page cache for every contender.
    with open(path, 'rb') as f:
      f.read()
  contenders = {
      f'jaxlab, {cores} threads': lambda: jaxlab_rate(folder, size, batch,
                                                      cores, 0),
      f'jaxlab, {workers or cores} worker processes': lambda: jaxlab_rate(
          folder, size, batch, 1, workers or cores),
      f'PyTorch DataLoader, num_workers={workers or cores}':
          lambda: torch_rate(folder, size, batch, workers or cores),
  }
  rates = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, run in contenders.items():
      rates[name].append(run())
  return {name: float(np.median(r)) for name, r in rates.items()}


def peak_rss_mib(folder: str, cache: str, budget_gb: float, size: int,
                 batch: int) -> float:
  """Peak resident MiB of launch.py training one epoch of `scratch`."""
  with tempfile.TemporaryDirectory() as workdir:
    subprocess.run(
        [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
         os.path.join(ROOT, 'configs', 'scratch.py'), '--workdir', workdir,
         f'--config.data.path={folder}', f'--config.data.image_size={size}',
         f'--config.data.cache={cache}',
         f'--config.data.memory_budget_gb={budget_gb}',
         f'--config.batch_size={batch}', f'--config.eval_batch_size={batch}',
         '--config.num_epochs=1', '--config.progress_bar=False'],
        check=True, capture_output=True, timeout=3600,
        env=dict(os.environ, XLA_FLAGS=''))
  # Each run is a new child: the largest so far is this one's (runs go from
  # the smaller expected peak to the larger).
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--folder', default='',
                      help='A folder of class sub-folders of JPEGs.')
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--workers', type=int, default=0,
                      help='Worker processes (default: one per core).')
  parser.add_argument('--skip-memory', action='store_true')
  args = parser.parse_args()
  from jaxlab import runtime  # pylint: disable=g-import-not-at-top
  runtime.apply_defaults()  # As launch.py runs.
  from jaxlab import loader  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as scratch:
    folder = args.folder or make_jpegs(os.path.join(scratch, 'jpegs'),
                                       args.images)
    count, cores = len(_paths(folder)), loader.cpu_count()
    print(f'{count} JPEGs, decoded, resized to {args.size} x {args.size} and '
          f'batched by {args.batch}; {cores} CPU cores; medians of '
          f'{args.repeats}')
    rates = throughput(folder, args.size, args.batch, args.repeats,
                       args.workers)
    torch_best = [v for k, v in rates.items() if k.startswith('PyTorch')][0]
    print('loader | img/s | img/s per core | / PyTorch')
    for name, rate in rates.items():
      print(f'{name} | {rate:.0f} | {rate / cores:.0f} | '
            f'{rate / torch_best:.2f}')
    if args.skip_memory:
      return
    decoded = count * args.size * args.size * 3
    budget_gb = decoded / 5 / 2**30
    print(f'peak resident memory, one epoch of scratch on these images '
          f'({decoded / 2**20:.0f} MiB decoded; streaming budget '
          f'{budget_gb * 1024:.0f} MiB, a fifth):')
    stream = peak_rss_mib(folder, 'auto', budget_gb, args.size, args.batch)
    print(f'  data.cache=auto, streamed: {stream:.0f} MiB')
    memory = peak_rss_mib(folder, 'memory', 0.0, args.size, args.batch)
    print(f'  data.cache=memory: {memory:.0f} MiB')
    print(f'  streaming holds {memory - stream:.0f} MiB less; the decoded '
          f'images are {decoded / 2**20:.0f} MiB')


if __name__ == '__main__':
  main()
