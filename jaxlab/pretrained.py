"""Pretrained VGG16 and ResNet weights from torchvision (or Keras) files.

    variables = load_torchvision_vgg16('vgg16-397923af.pth')
    logits = jaxlab.models.VGG16(num_classes=1000).apply(variables, nhwc_images)

gives torchvision's VGG16 logits for the same images in NCHW;
`load_torchvision_resnet18` and `load_torchvision_resnet50` do the same for
`models.ResNet18` and `ResNet50` (params and BatchNorm statistics). Readers:
  .pth / .pt     torchvision state dict (needs PyTorch)
  .safetensors   torchvision state dict (no PyTorch needed)
  .h5            Keras VGG16 weights, legacy (keras-applications' file) or
                 Keras 3 `.weights.h5`. Keras's weights expect Keras's own
                 preprocessing ('caffe': BGR, 0-255, ImageNet mean
                 subtracted, no scaling), not torchvision's.
  .msgpack       this project's own format, written by the `convert` command
                 below; the fastest to load.

In a config, `model.pretrained` names a file, or `torchvision` for the
model's official file (ImageNet-1K V1 weights) in the cache folder
($JAXLAB_CACHE, default ~/.cache/jaxlab),
downloaded there with its SHA-256 checked only if
`model.download_pretrained` is true.

Convert once, load fast:
    python -m jaxlab.pretrained convert vgg16-397923af.pth vgg16.msgpack
"""

import dataclasses
import math
import os
import sys
from typing import Callable, Mapping

import flax.serialization
import flax.traverse_util
import jax
import numpy as np

from jaxlab import downloads
from jaxlab import storage
from jaxlab import models
from jaxlab.errors import UserError


@dataclasses.dataclass(frozen=True)
class WeightsFile:
  url: str
  sha256: str

  @property
  def filename(self) -> str:
    return self.url.rsplit('/', 1)[-1]


TORCHVISION_VGG16 = WeightsFile(
    'https://download.pytorch.org/models/vgg16-397923af.pth',
    '397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0')
TORCHVISION_RESNET18 = WeightsFile(
    'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec')
TORCHVISION_RESNET50 = WeightsFile(
    'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    '0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a')

# torchvision's `features` indices of VGG16's 13 convolutions.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_DENSE_INDICES = (0, 3, 6)
HEAD = 'classifier.6'


def cache_dir() -> str:
  return os.environ.get('JAXLAB_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache',
                                     'jaxlab'))


def _vgg16_layer_names() -> list[str]:
  return ([f'features.{i}' for i in VGG16_CONV_INDICES] +
          [f'classifier.{i}' for i in VGG16_DENSE_INDICES])


# --------------------------------------------------------------------------
# torchvision state dicts.


def _read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(
        f'reading {path} needs PyTorch (pip install torch==2.13.0); or, on a '
        'machine with PyTorch, save it as .safetensors (VGG16 also converts '
        f'with `python -m jaxlab.pretrained convert {path} vgg16.msgpack`)'
    ) from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'cannot read PyTorch weights {path}: '
                    f'{str(e).splitlines()[0]}') from None
  if not isinstance(state, Mapping):
    raise UserError(f'{path} holds a {type(state).__name__}, not a state dict')
  state = state.get('state_dict', state)
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise UserError(f'cannot read safetensors weights {path}: {e}') from None


def params_from_torchvision_vgg16(state: Mapping[str, np.ndarray],
                                  where: str) -> dict:
  """Flax VGG16 params from torchvision's VGG16 state dict (numpy arrays)."""
  expected = {f'{layer}.{kind}' for layer in _vgg16_layer_names()
              for kind in ('weight', 'bias')}
  missing = sorted(expected - set(state))
  if missing:
    raise UserError(f'{where} is not a torchvision VGG16 state dict: it lacks '
                    f'{missing[0]} (and {len(missing) - 1} more)')
  extra = sorted(set(state) - expected)
  if extra:
    raise UserError(f'{where} has entries VGG16 does not: {extra[:3]}')
  params = {}
  for i in VGG16_CONV_INDICES:
    weight = np.asarray(state[f'features.{i}.weight'], np.float32)
    if weight.ndim != 4:
      raise UserError(f'{where}: features.{i}.weight has shape '
                      f'{weight.shape}, expected a 4-d convolution kernel')
    params[f'features.{i}'] = {
        'kernel': weight.transpose(2, 3, 1, 0),  # OIHW -> HWIO
        'bias': np.asarray(state[f'features.{i}.bias'], np.float32)}
  for i in VGG16_DENSE_INDICES:
    weight = np.asarray(state[f'classifier.{i}.weight'], np.float32)
    if weight.ndim != 2:
      raise UserError(f'{where}: classifier.{i}.weight has shape '
                      f'{weight.shape}, expected a 2-d matrix')
    if i == 0:
      # torchvision flattens (C, 7, 7); this model flattens (7, 7, C).
      out, flat = weight.shape
      if flat % 49:
        raise UserError(f'{where}: classifier.0.weight has shape '
                        f'{weight.shape}; its inputs must be C * 7 * 7')
      weight = weight.reshape(out, flat // 49, 7, 7).transpose(0, 2, 3, 1)
      weight = weight.reshape(out, flat)
    params[f'classifier.{i}'] = {
        'kernel': weight.T,
        'bias': np.asarray(state[f'classifier.{i}.bias'], np.float32)}
  return params


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torchvision state dict from `.pth`/`.pt` (read with PyTorch) or
  `.safetensors` (no PyTorch needed)."""
  _check_exists(path)
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  if path.endswith(('.pth', '.pt')):
    return _read_torch_state_dict(path)
  raise UserError(f'{path}: torchvision weights must be .pth, .pt or '
                  '.safetensors')


def load_torchvision_vgg16(path: str) -> dict:
  """Variables for `VGG16(num_classes=1000)` from a torchvision weights file.

  Args:
    path: torchvision's VGG16 state dict as `.pth`/`.pt` (read with PyTorch)
      or `.safetensors` (no PyTorch needed).
  Returns:
    {'params': ...} such that `VGG16(1000).apply(variables, nhwc)` equals
    torchvision's `vgg16(nchw)`.
  """
  return {'params': params_from_torchvision_vgg16(_read_state_dict(path),
                                                  path)}


# Flax variable names -> torchvision state-dict names, by collection.
_TORCH_NAMES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
                ('params', 'scale'): 'weight',
                ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var'}


def variables_from_torchvision(state: Mapping[str, np.ndarray], template,
                               where: str) -> dict:
  """Flax variables shaped like `template` from a torchvision state dict of
  a model whose flax modules carry torchvision's module names (ResNet).

  Convolution kernels go from OIHW to HWIO, dense ones are transposed,
  BatchNorm's weight becomes `scale` and its running statistics
  `batch_stats`; `num_batches_tracked` is not needed. A missing, extra or
  misshapen entry fails naming it.
  """
  expected = {}
  for collection, tree in template.items():
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      name = '.'.join(path[:-1] + (_TORCH_NAMES[collection, path[-1]],))
      expected[name] = (collection, path, tuple(leaf.shape))
  missing = sorted(set(expected) - set(state))
  if missing:
    raise UserError(f'{where} is not a torchvision state dict of this model: '
                    f'it lacks {missing[0]} (and {len(missing) - 1} more)')
  extra = sorted(k for k in set(state) - set(expected)
                 if not k.endswith('.num_batches_tracked'))
  if extra:
    raise UserError(f'{where} has entries the model does not: {extra[:3]}')
  variables = {collection: {} for collection in template}
  for name, (collection, path, shape) in expected.items():
    value = np.asarray(state[name], np.float32)
    if path[-1] == 'kernel' and value.ndim == len(shape):
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if value.shape != shape:
      raise UserError(f'{where}: {name} has shape {tuple(state[name].shape)}'
                      f', which does not fit the model\'s {shape}')
    variables[collection][path] = value
  return {c: flax.traverse_util.unflatten_dict(v)
          for c, v in variables.items()}


def _variable_shapes(model) -> dict:
  """The model's variables as shapes (its parameters do not depend on the
  image size)."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           np.zeros((1, 64, 64, 3),
                                                    np.float32)))


def _load_resnet(path: str, model) -> dict:
  return variables_from_torchvision(_read_state_dict(path),
                                    _variable_shapes(model), path)


def load_torchvision_resnet18(path: str) -> dict:
  """Variables ({'params', 'batch_stats'}) for `ResNet18(num_classes=1000)`
  from torchvision's ResNet-18 state dict (`.pth`/`.pt` with PyTorch,
  `.safetensors` without), such that `ResNet18(1000).apply(variables,
  nhwc)` equals torchvision's `resnet18().eval()(nchw)`."""
  return _load_resnet(path, models.ResNet18(1000))


def load_torchvision_resnet50(path: str) -> dict:
  """`load_torchvision_resnet18` for `ResNet50(num_classes=1000)`."""
  return _load_resnet(path, models.ResNet50(1000))


# --------------------------------------------------------------------------
# Keras.


def _keras_layers(f, path: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(kernel, bias) of each layer with weights, in the model's order."""
  import h5py  # pylint: disable=g-import-not-at-top
  if 'layer_names' in f.attrs:  # Legacy: keras-applications' own file.
    layers = []
    for name in f.attrs['layer_names']:
      name = name.decode() if isinstance(name, bytes) else name
      group = f[name]
      weight_names = [w.decode() if isinstance(w, bytes) else w
                      for w in group.attrs.get('weight_names', [])]
      if weight_names:
        layers.append(tuple(np.asarray(group[w]) for w in weight_names))
    return layers
  if 'layers' in f:  # Keras 3 `.weights.h5`: layers named by creation order.
    def order(name):
      base, _, suffix = name.rpartition('_')
      return (base, int(suffix)) if suffix.isdigit() else (name, 0)
    groups = [f['layers'][n] for n in sorted(f['layers'], key=order)]
    convs = [g for g in groups if g.name.split('/')[-1].startswith('conv')]
    denses = [g for g in groups if g.name.split('/')[-1].startswith('dense')]
    return [(np.asarray(g['vars']['0']), np.asarray(g['vars']['1']))
            for g in convs + denses if isinstance(g.get('vars'), h5py.Group)]
  raise UserError(f'{path} is not a Keras weights file (no layer_names, no '
                  'layers/)')


def load_keras_vgg16(path: str) -> dict:
  """Variables for `VGG16(num_classes=1000)` from Keras's VGG16 `.h5` weights.

  Keras computes in NHWC like this model, so no kernel needs reordering.
  The weights expect Keras's 'caffe' preprocessing (BGR, 0-255, ImageNet
  mean subtracted), not torchvision's normalisation.
  """
  import h5py  # pylint: disable=g-import-not-at-top
  _check_exists(path)
  try:
    with h5py.File(path, 'r') as f:
      layers = _keras_layers(f, path)
  except OSError as e:
    raise UserError(f'cannot read Keras weights {path}: {e}') from None
  names = _vgg16_layer_names()
  if len(layers) != len(names):
    raise UserError(f'{path} has {len(layers)} layers with weights; Keras '
                    f'VGG16 has {len(names)} (13 convolutions, 3 dense)')
  return {'params': {name: {'kernel': np.asarray(k, np.float32),
                            'bias': np.asarray(b, np.float32)}
                     for name, (k, b) in zip(names, layers)}}


# --------------------------------------------------------------------------
# Files, the cache, and fitting weights to a model.


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise UserError(f'pretrained weights file {path} does not exist')


def _read_msgpack(path: str) -> dict:
  _check_exists(path)
  try:
    with open(path, 'rb') as f:
      variables = flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'cannot read {path} as converted weights: {e}') from None
  if not isinstance(variables, dict) or 'params' not in variables:
    raise UserError(f'{path} holds no params; write it with `python -m '
                    'jaxlab.pretrained convert WEIGHTS OUT.msgpack`')
  return variables


def load_vgg16_file(path: str) -> dict:
  """Variables for `VGG16(1000)` from any supported weights file."""
  if path.endswith('.h5'):
    return load_keras_vgg16(path)
  if path.endswith('.msgpack'):
    return _read_msgpack(path)
  return load_torchvision_vgg16(path)


def resolve(spec: str, allow_download: bool,
            official: WeightsFile = TORCHVISION_VGG16) -> str:
  """The weights file that `model.pretrained=spec` names: `spec` itself, or
  for 'torchvision' the `official` file in the cache (downloaded, with its
  SHA-256 checked, only if `allow_download`)."""
  if spec != 'torchvision':
    return spec
  path = os.path.join(cache_dir(), official.filename)
  if os.path.isfile(path):
    return path
  if not allow_download:
    raise UserError(
        f'pretrained weights not found at {path}; download '
        f'{official.url} there (SHA-256 {official.sha256}), '
        'point --config.model.pretrained at a copy, or allow the download '
        'with --config.model.download_pretrained=True')
  return downloads.download(official.url, path, official.sha256)


def fit_to_model(pretrained: dict, params: dict, where: str,
                 keep: tuple[str, ...] = (HEAD,)) -> dict:
  """`params` with every layer but those in `keep` taken from `pretrained`.

  Every other parameter must be in `pretrained` with the same shape, and
  `pretrained` may hold nothing else; any mismatch fails naming the layer.
  """
  new = flax.traverse_util.flatten_dict(params, sep='/')
  old = flax.traverse_util.flatten_dict(pretrained, sep='/')
  kept = lambda name: name.split('/')[0] in keep
  for name, value in new.items():
    if kept(name):
      continue
    if name not in old:
      raise UserError(f'{where} has no weights for layer '
                      f'{name.replace("/", ".")} of the model')
    if tuple(old[name].shape) != tuple(value.shape):
      raise UserError(f'{where}: layer {name.replace("/", ".")} has shape '
                      f'{tuple(old[name].shape)} in the file but '
                      f'{tuple(value.shape)} in the model')
    new[name] = np.asarray(old[name], value.dtype)
  extra = sorted(n for n in old if n not in new and not kept(n))
  if extra:
    raise UserError(f'{where} has weights for layers the model lacks: '
                    f'{[n.replace("/", ".") for n in extra[:3]]}')
  return flax.traverse_util.unflatten_dict(new, sep='/')


def _load_resnet_for(path: str, model_config) -> dict:
  """The config's ResNet (its widths too) at 1000 classes, from `path`."""
  if path.endswith('.msgpack'):
    return _read_msgpack(path)
  return _load_resnet(path, models.create_model(model_config, 1000))


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """How a model's pretrained weights load: `load(path, model_config)`
  gives the variables at 1000 classes; `head` is the layer that stays
  fresh."""
  load: Callable[[str, object], dict]
  official: WeightsFile
  head: str


PRETRAINED = {
    'vgg16': Pretrained(lambda path, _: load_vgg16_file(path),
                        TORCHVISION_VGG16, HEAD),
    'resnet18': Pretrained(_load_resnet_for, TORCHVISION_RESNET18, 'fc'),
    'resnet50': Pretrained(_load_resnet_for, TORCHVISION_RESNET50, 'fc'),
}


def load_for_model(model_config, variables: dict) -> dict:
  """`variables` with the pretrained weights that `model_config` asks for.

  The head (`classifier.6`, `fc`) keeps its fresh initialisation, sized for
  the dataset's classes; every other layer's parameters and BatchNorm
  statistics come from the weights file.
  """
  if model_config.name not in PRETRAINED:
    raise UserError(f'config model.pretrained is set, but model '
                    f'{model_config.name!r} has no pretrained weights; these '
                    f'do: {sorted(PRETRAINED)}')
  spec = PRETRAINED[model_config.name]
  path = resolve(model_config.pretrained, model_config.download_pretrained,
                 spec.official)
  loaded = spec.load(path, model_config)
  return {collection: fit_to_model(loaded.get(collection, {}), tree, path,
                                   keep=(spec.head,))
          for collection, tree in variables.items()}


def convert(source: str, destination: str) -> None:
  """Writes `source`'s VGG16 params in this project's fast `.msgpack` format."""
  variables = load_vgg16_file(source)
  params = jax.tree.map(np.asarray, variables)
  storage.write_atomic(destination,
                       flax.serialization.msgpack_serialize(params))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  print(f'wrote {destination}: VGG16, {n:,} parameters')


def main(argv: list[str]) -> None:
  if len(argv) != 4 or argv[1] != 'convert' or not argv[3].endswith('.msgpack'):
    sys.exit('usage: python -m jaxlab.pretrained convert WEIGHTS OUT.msgpack')
  try:
    convert(argv[2], argv[3])
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main(sys.argv)
