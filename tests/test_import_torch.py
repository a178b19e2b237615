"""Tests of `ffkd_jax.import_torch`: PyTorch zoo checkpoints -> ffkd_jax teacher checkpoints.

The round trip: a PyTorch model of `tests/torch_zoo.py` (RepDistiller's definitions and names)
with random weights and batch statistics, saved as RepDistiller saves a teacher, converted by
`import_checkpoint` and loaded by the trainer's `load_pretrained_role`, gives the logits and every
feature of the Flax model, for every CIFAR architecture in the registry.

Feature conventions compared (both sides follow RepDistiller, see tests/torch_zoo.py):
  - wrn_*: `stage{i}_preact` is stage i's output through the next batch norm on both sides;
  - shufflenetv2: RepDistiller returns `stage{i}_preact` before the last block's channel
    shuffle, ffkd_jax after it, so the PyTorch one is shuffled before comparing.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow

from ffkd_jax import import_torch, models
from ffkd_jax.checkpoint import load_pretrained_role

torch = pytest.importorskip('torch')
from tests import torch_zoo  # noqa: E402  (needs torch)

NUM_CLASSES = 100
BATCH = 2
TOLERANCE = 1e-4  # of max(1, the largest magnitude of the PyTorch tensor)
CIFAR_MODELS = [name for name in models.available_models() if models.model_input_size(name) == 32]


def _random_torch_model(arch: str, num_classes: int = NUM_CLASSES, seed: int = 0):
  """A zoo model in eval mode with random weights and non-trivial batch statistics.

  Batch norm affine parameters are randomised, then one train-mode forward with momentum 1
  sets every running mean / variance to the statistics of a random batch at that layer (so that
  activations keep a sensible scale through deep models), which are then perturbed.
  """
  torch.manual_seed(seed)
  model = torch_zoo.build(arch, num_classes)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for norm in norms:
      norm.weight.uniform_(0.5, 1.5)
      norm.bias.normal_(0.0, 0.2)
      norm.momentum = 1.0
    for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
      linear.bias.normal_(0.0, 0.1)
    model.train()
    model(torch.randn(BATCH, 3, 32, 32))
    for norm in norms:
      norm.momentum = 0.1
      norm.running_mean.add_(0.1 * torch.randn_like(norm.running_mean))
      norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.8, 1.25))
  return model.eval()


def _inputs(seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)


def _torch_outputs(model, x_nhwc: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Logits and features (NHWC) of a PyTorch zoo model on an NHWC batch."""
  with torch.no_grad():
    logits, features = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)).contiguous())
  to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.numpy()
  return logits.numpy(), {k: to_nhwc(v) for k, v in features.items()}


def _channel_shuffle_nhwc(x: np.ndarray, groups: int) -> np.ndarray:
  n, h, w, c = x.shape
  return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


def _template(arch: str, num_classes: int = NUM_CLASSES):
  model = models.create_model(arch, num_classes)
  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return model, variables['params'], variables['batch_stats']


def _scaled_error(got, want) -> float:
  want = np.asarray(want)
  return float(np.max(np.abs(np.asarray(got) - want)) / max(1.0, np.max(np.abs(want))))


@pytest.mark.parametrize('arch', CIFAR_MODELS)
def test_round_trip_matches_pytorch(arch, tmp_path):
  torch_model = _random_torch_model(arch)
  x = _inputs()
  want_logits, want_features = _torch_outputs(torch_model, x)
  source = tmp_path / f'{arch}.pth'
  torch.save({'model': torch_model.state_dict()}, source)

  out = tmp_path / 'converted'
  meta = import_torch.import_checkpoint(arch, str(source), str(out), NUM_CLASSES)
  assert meta == {
      'roles': {'model': arch},
      'num_classes': NUM_CLASSES,
      'method': 'imported_torch',
      'source': str(source),
  }

  flax_model, template_params, template_stats = _template(arch)
  params, batch_stats, loaded_meta = load_pretrained_role(
      str(out), arch, NUM_CLASSES, template_params, template_stats
  )
  assert loaded_meta['method'] == 'imported_torch'
  apply = jax.jit(functools.partial(flax_model.apply, train=False))  # faster than op by op
  logits, features = apply({'params': params, 'batch_stats': batch_stats}, x)

  if arch == 'shufflenetv2':  # RepDistiller's preact is taken before the shuffle
    for key in [k for k in want_features if k.endswith('_preact')]:
      want_features[key] = _channel_shuffle_nhwc(want_features[key], 2)
  assert set(features) == set(want_features)
  errors = {'logits': _scaled_error(logits, want_logits)}
  for key, want in want_features.items():
    assert features[key].shape == want.shape, key
    errors[key] = _scaled_error(features[key], want)
  print(f'{arch}: max |logits error| = {np.max(np.abs(logits - want_logits)):.2e}')
  assert max(errors.values()) <= TOLERANCE, {k: v for k, v in errors.items() if v > TOLERANCE}
  assert np.std(want_logits) > 1e-2  # the comparison is not between near-constant outputs


@pytest.fixture(scope='module')
def resnet8_state_dict():
  return _random_torch_model('resnet8').state_dict()


def test_dataparallel_prefix_bare_state_dict_and_counters_are_accepted(resnet8_state_dict):
  prefixed = {f'module.{k}': v for k, v in resnet8_state_dict.items()}
  assert any(k.endswith('num_batches_tracked') for k in prefixed)
  params, stats = import_torch.convert_state_dict('resnet8', prefixed, NUM_CLASSES)
  np.testing.assert_array_equal(
      params['layer1_0']['conv1']['kernel'],
      resnet8_state_dict['layer1.0.conv1.weight'].numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(params['fc']['kernel'], resnet8_state_dict['fc.weight'].numpy().T)
  np.testing.assert_array_equal(
      stats['layer3_0']['downsample_1']['var'],
      resnet8_state_dict['layer3.0.downsample.1.running_var'].numpy(),
  )
  assert (
      import_torch.unwrap_state_dict({'epoch': 240, 'model': prefixed}).keys()
      == import_torch.unwrap_state_dict(resnet8_state_dict).keys()
  )


def test_missing_and_unexpected_keys_are_named(resnet8_state_dict):
  state_dict = dict(resnet8_state_dict)
  del state_dict['layer2.0.bn1.running_var']
  state_dict['proj_head.weight'] = torch.zeros(4, 64)
  with pytest.raises(ValueError) as error:
    import_torch.convert_state_dict('resnet8', state_dict, NUM_CLASSES)
  message = str(error.value)
  assert "'resnet8'" in message
  assert 'missing keys: layer2.0.bn1.running_var' in message
  assert 'unexpected keys: proj_head.weight' in message


def test_shape_mismatch_names_key_and_both_shapes(resnet8_state_dict):
  state_dict = dict(resnet8_state_dict, **{'layer1.0.conv2.weight': torch.zeros(16, 8, 3, 3)})
  with pytest.raises(
      ValueError,
      match=r"'layer1\.0\.conv2\.weight' is \(16, 8, 3, 3\) in the "
      r'checkpoint, \(16, 16, 3, 3\) in the model',
  ):
    import_torch.convert_state_dict('resnet8', state_dict, NUM_CLASSES)
  with pytest.raises(
      ValueError,
      match=r"--num-classes 100.*'fc\.weight' is \(100, 64\) in the "
      r'checkpoint, \(10, 64\) in the model',
  ):
    import_torch.convert_state_dict('resnet8', resnet8_state_dict, 10)


def test_checkpoint_of_another_architecture_names_both(tmp_path):
  source = tmp_path / 'resnet8x4.pth'
  torch.save({'model': torch_zoo.build('resnet8x4', NUM_CLASSES).state_dict()}, source)
  with pytest.raises(ValueError) as error:
    import_torch.import_checkpoint('resnet32x4', str(source), str(tmp_path / 'out'), NUM_CLASSES)
  message = str(error.value)
  assert "does not match 'resnet32x4'" in message
  assert "It looks like a 'resnet8x4' checkpoint" in message
  assert not (tmp_path / 'out').exists()

  # Converted as what it is, the trainer still refuses it for another teacher model.
  out = tmp_path / 'converted'
  import_torch.import_checkpoint('resnet8x4', str(source), str(out), NUM_CLASSES)
  _, template_params, template_stats = _template('resnet32x4')
  with pytest.raises(ValueError, match=r"model='resnet32x4'.*role 'model' is 'resnet8x4'"):
    load_pretrained_role(str(out), 'resnet32x4', NUM_CLASSES, template_params, template_stats)


def test_cli_end_to_end(tmp_path, capsys, resnet8_state_dict):
  source = tmp_path / 'ckpt_epoch_240.pth'
  torch.save(
      {
          'epoch': 240,
          'best_acc': torch.tensor(72.5),
          'model': {f'module.{k}': v for k, v in resnet8_state_dict.items()},
      },
      source,
  )
  out = tmp_path / 'teacher'
  argv = [
      '--arch',
      'resnet8',
      '--checkpoint',
      str(source),
      '--out',
      str(out),
      '--num-classes',
      str(NUM_CLASSES),
  ]
  assert import_torch.main(argv) == 0
  assert str(out) in capsys.readouterr().out
  _, template_params, template_stats = _template('resnet8')
  params, _, meta = load_pretrained_role(
      str(tmp_path / 'teacher'), 'resnet8', NUM_CLASSES, template_params, template_stats
  )
  assert meta['roles'] == {'model': 'resnet8'} and meta['source'] == str(source)
  np.testing.assert_array_equal(params['bn1']['scale'], resnet8_state_dict['bn1.weight'].numpy())

  assert import_torch.main(argv) == 1  # exists
  assert '--overwrite' in capsys.readouterr().err
  assert import_torch.main(argv + ['--overwrite']) == 0
  assert (
      import_torch.main(
          ['--arch', 'resnet9', '--checkpoint', str(source), '--out', str(tmp_path / 'x')]
      )
      == 1
  )
  err = capsys.readouterr().err
  assert "unknown architecture 'resnet9'" in err and 'resnet32x4' in err


def test_arch_names():
  assert import_torch.resolve_arch('ShuffleV2') == 'shufflenetv2'
  assert import_torch.resolve_arch('mobile_half') == 'mobilenetv2'
  assert import_torch.resolve_arch('ResNet50') == 'resnet50_cifar'
  with pytest.raises(ValueError, match=r"unknown architecture 'resnet7'; valid: .*wrn_40_2"):
    import_torch.resolve_arch('resnet7')
  assert (
      import_torch.torch_name('params', ('blocks_0_0', 'conv_3', 'kernel'))
      == 'blocks.0.0.conv.3.weight'
  )
  assert (
      import_torch.torch_name('batch_stats', ('block1', 'layer_0', 'bn1', 'mean'))
      == 'block1.layer.0.bn1.running_mean'
  )


def test_missing_torch_is_explained(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match=r"pip install 'ffkd_jax\[torch\]'"):
    import_torch.load_torch_file(str(tmp_path / 'any.pth'))
