"""ResNet-18/50 in torchvision's layout: counts, names, ported weights that
give a PyTorch reference's logits, and the freezing presets."""

import flax.traverse_util
import jax
import ml_collections
import numpy as np
import pytest

from configs import resnet18_finetune
from configs import resnet18_freeze_backbone
from jaxlab import models
from jaxlab import platforms
from jaxlab import pretrained
from jaxlab import steps
from jaxlab import summary
from jaxlab.errors import UserError
from tests.conftest import train_checking_freezing

_STAGES = {'resnet18': ((2, 2, 2, 2), False), 'resnet50': ((3, 4, 6, 3), True)}
_MODELS = {'resnet18': models.ResNet18, 'resnet50': models.ResNet50}
_LOADERS = {'resnet18': pretrained.load_torchvision_resnet18,
            'resnet50': pretrained.load_torchvision_resnet50}


@pytest.mark.parametrize('name,count', [('resnet18', 11_689_512),
                                        ('resnet50', 25_557_032)])
def test_parameter_counts_and_torchvision_names(name, count):
  s = summary.summarize(_MODELS[name](num_classes=1000), (224, 224, 3), 1)
  assert s.total_params == count
  names = {layer.name for layer in s.layers}
  assert {'conv1', 'bn1', 'layer1.0.conv1', 'layer1.0.bn1',
          'layer2.0.downsample.0', 'layer2.0.downsample.1',
          'layer4.1.conv2', 'fc'} <= names
  assert ('layer1.0.downsample.0' in names) == (name == 'resnet50')
  assert s.mult_adds > 1.8e9  # Convolutions, strided ones included.


def _torch_files(torch, tmp_path, name):
  """A reference ResNet with random weights and BatchNorm statistics, saved
  as .pth and .safetensors."""
  from safetensors.torch import save_file
  from benchmarks.torch_models import TorchResNet
  torch.manual_seed(0)
  model = TorchResNet(*_STAGES[name]).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  pth, st = str(tmp_path / f'{name}.pth'), str(tmp_path / f'{name}.safetensors')
  torch.save(model.state_dict(), pth)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
  return model, pth, st


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_ported_torchvision_weights_give_torch_logits(name, tmp_path):
  torch = pytest.importorskip('torch')
  model, pth, st = _torch_files(torch, tmp_path, name)
  variables = _LOADERS[name](st)
  jax.tree.map(np.testing.assert_array_equal, _LOADERS[name](pth), variables)
  ours = _MODELS[name](num_classes=1000)
  rng = np.random.default_rng(0)
  for height, width in ((224, 224), (100, 132)):
    images = rng.normal(size=(2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
      reference = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    for cpu in (False, True):  # The plain program and the CPU one.
      def logits(v, x, cpu=cpu):
        with platforms.tracing_cpu_program(cpu):
          return ours.apply(v, x)
      got = np.asarray(jax.jit(logits)(variables, images))
      scale = np.abs(reference.numpy()).max()
      np.testing.assert_allclose(got, reference.numpy(), rtol=1e-4,
                                 atol=1e-4 * scale, err_msg=f'{height}x{width}')


def test_bad_resnet_files_name_the_entry(tmp_path):
  torch = pytest.importorskip('torch')
  _, pth, _ = _torch_files(torch, tmp_path, 'resnet18')
  state = torch.load(pth)
  with pytest.raises(UserError, match=r'lacks conv1.weight'):
    pretrained.variables_from_torchvision(
        {k: v.numpy() for k, v in state.items() if k != 'conv1.weight'},
        pretrained._variable_shapes(models.ResNet18(1000)), 'file.pth')
  state['layer3.1.bn2.running_var'] = state['layer3.1.bn2.running_var'][:7]
  with pytest.raises(UserError, match=r'file.pth: layer3.1.bn2.running_var '
                     r'has shape \(7,\)'):
    pretrained.variables_from_torchvision(
        {k: v.numpy() for k, v in state.items()},
        pretrained._variable_shapes(models.ResNet18(1000)), 'file.pth')
  # A ResNet-18 file is not a ResNet-50 one.
  with pytest.raises(UserError, match=r'not a torchvision state dict of this'):
    pretrained.load_torchvision_resnet50(pth)


def test_load_for_model_keeps_a_new_head_and_loads_batch_stats(tmp_path):
  torch = pytest.importorskip('torch')
  _, _, st = _torch_files(torch, tmp_path, 'resnet18')
  model = models.ResNet18(num_classes=7)
  fresh = jax.jit(model.init)(jax.random.PRNGKey(0),
                              np.zeros((1, 32, 32, 3), np.float32))
  config = ml_collections.ConfigDict(dict(name='resnet18', pretrained=st,
                                          download_pretrained=False))
  loaded = pretrained.load_for_model(config, fresh)
  file = pretrained.load_torchvision_resnet18(st)
  np.testing.assert_array_equal(loaded['batch_stats']['layer2.0']['bn1']['var'],
                                file['batch_stats']['layer2.0']['bn1']['var'])
  np.testing.assert_array_equal(loaded['params']['conv1']['kernel'],
                                file['params']['conv1']['kernel'])
  np.testing.assert_array_equal(loaded['params']['fc']['kernel'],
                                fresh['params']['fc']['kernel'])
  assert loaded['params']['fc']['kernel'].shape == (512, 7)


@pytest.mark.parametrize('config_module,trains', [
    (resnet18_finetune, 'everything'),
    (resnet18_freeze_backbone, 'fc only')])
def test_freezing_presets_train_only_what_they_say(config_module, trains):
  config = config_module.get_config()
  model = models.ResNet18(num_classes=5, widths=(4, 8, 8, 16),
                          axis_name=steps.AXIS)
  state = steps.create_train_state(model, config.optimizer,
                                   jax.random.PRNGKey(0), (32, 32, 3))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (1, 4, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 5, (1, 4)).astype(np.int32)}
  backbone = {path for path in flax.traverse_util.flatten_dict(state.params)
              if path[0] != 'fc'}
  assert state.frozen == (backbone if trains == 'fc only' else set())
  train_checking_freezing(
      state, batch, lambda opt_state: opt_state.inner_states[
          'trainable'].inner_state[0].trace)


@pytest.mark.parametrize('name,filename', [
    ('resnet18', 'resnet18-f37072fd.pth'), ('resnet50', 'resnet50-0676ba61.pth')])
def test_missing_official_file_names_it_and_its_url(name, filename, tmp_path,
                                                    monkeypatch):
  monkeypatch.setenv('JAXLAB_CACHE', str(tmp_path))
  config = ml_collections.ConfigDict(dict(name=name, pretrained='torchvision',
                                          download_pretrained=False))
  with pytest.raises(UserError) as e:
    pretrained.load_for_model(config, {'params': {}})
  message = str(e.value)
  assert str(tmp_path / filename) in message
  assert f'https://download.pytorch.org/models/{filename}' in message
  assert pretrained.PRETRAINED[name].official.sha256.startswith(
      filename.split('-')[1][:8])  # torchvision's names carry the hash.
