"""Ported VGG16 weights give the reference models' logits; bad files fail."""

import http.server
import os
import threading

import jax
import numpy as np
import pytest

from jaxlab import downloads
from jaxlab import models
from jaxlab import pretrained
from jaxlab import storage
from jaxlab.errors import UserError


def _assert_logits_close(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  scale = np.abs(reference).max()
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope='module')
def torch_vgg16_files(tmp_path_factory):
  """A full-size reference VGG16 with random weights, saved both ways."""
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file
  from benchmarks.torch_models import TorchVGG16
  torch.manual_seed(0)
  model = TorchVGG16().eval()
  folder = tmp_path_factory.mktemp('torch_vgg16')
  pth, st = str(folder / 'vgg16.pth'), str(folder / 'vgg16.safetensors')
  torch.save(model.state_dict(), pth)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
  return model, pth, st


@pytest.mark.parametrize('height,width', [(224, 224), (100, 132)])
def test_ported_torchvision_weights_give_torch_logits(torch_vgg16_files,
                                                      height, width):
  import torch
  model, pth, st = torch_vgg16_files
  from_pth = pretrained.load_torchvision_vgg16(pth)
  from_st = pretrained.load_torchvision_vgg16(st)
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_st)
  images = np.random.default_rng(0).normal(size=(2, height, width, 3))
  images = images.astype(np.float32)
  with torch.no_grad():
    reference = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = jax.jit(models.VGG16(num_classes=1000).apply)(from_st, images)
  _assert_logits_close(ours, reference)


def test_adaptive_pool_matches_torch_for_many_sizes():
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(1).normal(size=(1, 13, 5, 2)).astype(np.float32)
  for out in [(7, 7), (3, 4), (13, 5), (20, 9)]:
    ours = models.adaptive_avg_pool(x, out)
    reference = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), out).numpy()
    np.testing.assert_allclose(ours, reference.transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)


def test_ported_keras_weights_give_keras_logits(tmp_path):
  keras = pytest.importorskip('keras')
  keras.utils.set_random_seed(0)
  model = keras.applications.VGG16(weights=None, classifier_activation=None)
  images = np.random.default_rng(0).normal(size=(2, 224, 224, 3))
  images = images.astype(np.float32)
  reference = np.asarray(model(images, training=False))
  native = str(tmp_path / 'vgg16.weights.h5')
  model.save_weights(native)
  files = [native]
  try:
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    legacy = str(tmp_path / 'vgg16_legacy.h5')
    with h5py.File(legacy, 'w') as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
    files.append(legacy)
  except ImportError:
    pass
  apply = jax.jit(models.VGG16(num_classes=1000).apply)
  for path in files:
    variables = pretrained.load_keras_vgg16(path)
    _assert_logits_close(apply(variables, images), reference)


def _small_torchvision_state(widths=(4, 8, 8, 16, 16), classifier_width=32):
  rng = np.random.default_rng(0)
  state, channels = {}, 3
  index = 0
  for width, depth in zip(widths, (2, 2, 3, 3, 3)):
    for _ in range(depth):
      state[f'features.{index}.weight'] = rng.normal(
          0, np.sqrt(2 / (9 * channels)), (width, channels, 3, 3)).astype(
              np.float32)
      state[f'features.{index}.bias'] = np.zeros(width, np.float32)
      channels, index = width, index + 2
    index += 1
  for i, (n_in, n_out) in zip((0, 3, 6), ((channels * 49, classifier_width),
                                         (classifier_width, classifier_width),
                                         (classifier_width, 1000))):
    state[f'classifier.{i}.weight'] = rng.normal(
        0, np.sqrt(1 / n_in), (n_out, n_in)).astype(np.float32)
    state[f'classifier.{i}.bias'] = np.zeros(n_out, np.float32)
  return state


def _save_safetensors(state, path):
  from safetensors.numpy import save_file
  save_file(state, path)
  return path


def _small_model_params(num_classes=15):
  model = models.VGG16(num_classes=num_classes, widths=(4, 8, 8, 16, 16),
                       classifier_width=32)
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))))['params']


def test_fit_keeps_a_new_head_and_loads_the_rest(tmp_path):
  path = _save_safetensors(_small_torchvision_state(),
                           str(tmp_path / 'small.safetensors'))
  loaded = pretrained.load_torchvision_vgg16(path)['params']
  fresh = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype),
                       _small_model_params())
  fitted = pretrained.fit_to_model(loaded, fresh, path)
  np.testing.assert_array_equal(fitted['features.0']['kernel'],
                                loaded['features.0']['kernel'])
  assert fitted['classifier.6']['kernel'].shape == (32, 15)
  assert np.all(fitted['classifier.6']['kernel'] == 7.0)


def test_mismatched_weights_name_the_layer_and_both_shapes(tmp_path):
  state = _small_torchvision_state()
  state['features.10.weight'] = state['features.10.weight'][:, :4]
  path = _save_safetensors(state, str(tmp_path / 'bad.safetensors'))
  loaded = pretrained.load_torchvision_vgg16(path)['params']
  with pytest.raises(UserError, match=r'layer features.10.kernel has shape '
                     r'\(3, 3, 4, 8\) in the file but \(3, 3, 8, 8\) in the '
                     'model'):
    pretrained.fit_to_model(loaded, _small_model_params(), path)
  del state['classifier.3.bias']
  path = _save_safetensors(state, str(tmp_path / 'missing.safetensors'))
  with pytest.raises(UserError, match=r'lacks classifier.3.bias'):
    pretrained.load_torchvision_vgg16(path)


def test_truncated_files_fail_with_their_name(tmp_path):
  path = _save_safetensors(_small_torchvision_state(),
                           str(tmp_path / 'cut.safetensors'))
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  with pytest.raises(UserError, match=r'cannot read safetensors weights '
                     r'.*cut.safetensors'):
    pretrained.load_torchvision_vgg16(path)
  h5 = tmp_path / 'cut.h5'
  h5.write_bytes(b'\x89HDF\r\n\x1a\n' + b'\0' * 100)
  with pytest.raises(UserError, match=r'cannot read Keras weights .*cut.h5'):
    pretrained.load_keras_vgg16(str(h5))


def test_truncated_pth_fails_with_its_name(tmp_path):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'cut.pth')
  torch.save({k: torch.from_numpy(v) for k, v in
              _small_torchvision_state().items()}, path)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  with pytest.raises(UserError, match=r'cannot read PyTorch weights .*cut.pth'):
    pretrained.load_torchvision_vgg16(path)


def test_convert_writes_a_file_that_loads_the_same(tmp_path):
  source = _save_safetensors(_small_torchvision_state(),
                             str(tmp_path / 'small.safetensors'))
  out = str(tmp_path / 'small.msgpack')
  pretrained.main(['pretrained', 'convert', source, out])
  jax.tree.map(np.testing.assert_array_equal,
               pretrained.load_vgg16_file(out),
               pretrained.load_torchvision_vgg16(source))


def test_missing_official_file_says_where_and_how(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXLAB_CACHE', str(tmp_path))
  with pytest.raises(UserError) as e:
    pretrained.resolve('torchvision', allow_download=False)
  message = str(e.value)
  assert str(tmp_path / 'vgg16-397923af.pth') in message
  assert 'https://download.pytorch.org/models/vgg16-397923af.pth' in message
  assert 'download_pretrained=True' in message
  with pytest.raises(UserError, match=r'does not exist'):
    pretrained.load_vgg16_file(str(tmp_path / 'nope.safetensors'))


@pytest.fixture
def file_server(tmp_path):
  """Serves tmp_path/served over HTTP on the loopback interface."""
  served = tmp_path / 'served'
  served.mkdir()

  class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(served), **kwargs)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield served, f'http://127.0.0.1:{server.server_address[1]}'
  server.shutdown()


def test_download_checks_sha256_and_leaves_nothing_on_mismatch(file_server,
                                                               tmp_path):
  served, url = file_server
  (served / 'weights.bin').write_bytes(b'pretend weights' * 1000)
  expected = downloads.sha256_of(str(served / 'weights.bin'))
  cache = tmp_path / 'cache'
  got = downloads.download(f'{url}/weights.bin', str(cache / 'w.bin'),
                           expected)
  assert open(got, 'rb').read() == b'pretend weights' * 1000
  with pytest.raises(UserError, match=r'has SHA-256 .* expected 0000'):
    downloads.download(f'{url}/weights.bin', str(cache / 'x.bin'), '0' * 64)
  assert sorted(os.listdir(cache)) == ['w.bin']
  with pytest.raises(UserError, match=r'downloading .*missing.bin failed'):
    downloads.download(f'{url}/missing.bin', str(cache / 'y.bin'), '0' * 64)


def test_a_download_that_does_not_fit_is_named_and_removed(file_server,
                                                          small_disk):
  served, url = file_server
  (served / 'weights.bin').write_bytes(b'w' * 300_000)
  destination = os.path.join(small_disk.path, 'cache', 'w.bin')
  small_disk.fill(leave=64 << 10)
  with pytest.raises(storage.WriteFailed) as e:
    downloads.download(f'{url}/weights.bin', destination,
                       downloads.sha256_of(str(served / 'weights.bin')))
  assert str(e.value).startswith(
      f'could not write {destination}: No space left on device (the write '
      'needed 293.0 KiB; '), e.value
  assert os.listdir(os.path.dirname(destination)) == []


def test_official_weights_download_into_the_cache(file_server, tmp_path,
                                                  monkeypatch):
  served, url = file_server
  path = _save_safetensors(_small_torchvision_state(),
                           str(served / 'vgg16-397923af.pth'))
  monkeypatch.setenv('JAXLAB_CACHE', str(tmp_path / 'cache'))
  official = pretrained.WeightsFile(f'{url}/vgg16-397923af.pth',
                                    downloads.sha256_of(path))
  got = pretrained.resolve('torchvision', allow_download=True,
                           official=official)
  assert got == str(tmp_path / 'cache' / 'vgg16-397923af.pth')
  assert downloads.sha256_of(got) == downloads.sha256_of(path)
  # Found in the cache, it is used without any network.
  assert pretrained.resolve('torchvision', allow_download=False,
                            official=official) == got
