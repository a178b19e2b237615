"""Tests of the model zoo: registry, parameter counts, feature contract, batch norm."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ffkd_jax.models import available_models, create_model, layers, model_input_size, norm

# Parameter counts in millions, for 100 classes (CIFAR models) or 1000 (ImageNet models).
# Published: the figures the KD papers built on the RepDistiller zoo quote for resnet8x4,
# resnet32x4, resnet20/56/110, wrn_40_2/16_2/40_1, vgg8/13, MobileNetV2 (mobile_half),
# ShuffleNetV1/V2 and the CIFAR ResNet50; torchvision's counts for resnet18/34/50; 4.2M for
# MobileNetV1 (Howard et al., 2017). The rest (resnet8/14/32/44, wrn_16_1, vgg11/16/19) are
# counted by hand from the PyTorch definitions (convs, batch norm scale + bias, classifier).
EXPECTED_PARAMS_M = {
    'resnet8': 0.084,
    'resnet14': 0.181,
    'resnet20': 0.28,
    'resnet32': 0.47,
    'resnet44': 0.67,
    'resnet56': 0.86,
    'resnet110': 1.74,
    'resnet8x4': 1.23,
    'resnet32x4': 7.43,
    'wrn_16_1': 0.181,
    'wrn_16_2': 0.70,
    'wrn_40_1': 0.57,
    'wrn_40_2': 2.26,
    'vgg8': 3.96,
    'vgg11': 9.28,
    'vgg13': 9.46,
    'vgg16': 14.77,
    'vgg19': 20.09,
    'mobilenetv2': 0.81,
    'shufflenetv1': 0.95,
    'shufflenetv2': 1.36,
    'resnet50_cifar': 23.7,
    'resnet18': 11.69,
    'resnet34': 21.80,
    'resnet50': 25.56,
    'mobilenetv1': 4.23,
}
IMAGENET_MODELS = {'resnet18', 'resnet34', 'resnet50', 'mobilenetv1'}

# Feature shapes (without the batch dimension) for a 32x32 input.
# Models whose first block is a stem (RepDistiller's f0) rather than a stage.
STEMS = {'vgg8': {'stem', 'stem_preact'}}
CIFAR_FEATURES = {
    'resnet8': [(32, 32, 16), (16, 16, 32), (8, 8, 64)],
    'wrn_16_1': [(32, 32, 16), (16, 16, 32), (8, 8, 64)],
    'vgg8': [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)],  # after its (32, 32, 64) stem
    'mobilenetv2': [(16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)],
    'shufflenetv1': [(16, 16, 240), (8, 8, 480), (4, 4, 960)],
    'shufflenetv2': [(16, 16, 116), (8, 8, 232), (4, 4, 464)],
}
EMBEDDING_DIM = {
    'resnet8': 64,
    'wrn_16_1': 64,
    'vgg8': 512,
    'mobilenetv2': 1280,
    'shufflenetv1': 960,
    'shufflenetv2': 1024,
}


def _num_classes(name):
  return 1000 if name in IMAGENET_MODELS else 100


def _input(name, batch=1):
  size = model_input_size(name)
  return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)


def _random_variables(model, x, seed=0):
  """Variables of the right shapes, filled with NumPy random numbers.

  Faster than `model.init` on CPU, whose compile time is mostly the PRNG.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':  # He-scaled, so activations stay O(1) through deep nets
      scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(scale=scale, size=leaf.shape), leaf.dtype)
    if name in ('scale', 'var'):
      return jnp.asarray(rng.uniform(0.5, 1.5, size=leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(scale=0.1, size=leaf.shape), leaf.dtype)  # bias, mean

  return jax.tree.map_with_path(fill, shapes)


def test_registry_lists_the_zoo():
  assert sorted(EXPECTED_PARAMS_M) == available_models()
  for name in available_models():
    assert model_input_size(name) == (224 if name in IMAGENET_MODELS else 32)


def test_unknown_name_is_a_value_error_listing_valid_names():
  expected = r"config\.model: unknown model 'resnet9'; valid: .*resnet8x4"
  with pytest.raises(ValueError, match=expected):
    create_model('resnet9', num_classes=10)
  with pytest.raises(ValueError, match=r"config\.teacher\.model: unknown model 'vgg7'"):
    create_model('vgg7', num_classes=10, field='config.teacher.model')
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    model_input_size('nope')
  with pytest.raises(ValueError, match='num_classes'):
    create_model('resnet8', num_classes=0)


@pytest.mark.parametrize('name', sorted(EXPECTED_PARAMS_M))
def test_parameter_count_and_batch_norm_settings(name):
  model = create_model(name, _num_classes(name), axis_name='data')
  batch_norms = []

  def record_batch_norms(next_fun, args, kwargs, context):
    if isinstance(context.module, norm.BatchNorm) and context.method_name == '__call__':
      batch_norms.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_batch_norms):
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), _input(name)
    )

  assert set(variables) == {'params', 'batch_stats'}
  num_params = sum(leaf.size for leaf in jax.tree.leaves(variables['params']))
  expected = EXPECTED_PARAMS_M[name] * 1e6
  assert abs(num_params - expected) <= 0.02 * expected, (name, num_params, expected)

  assert batch_norms, name
  for bn in batch_norms:
    assert (bn.momentum, bn.epsilon, bn.axis_name) == (0.9, 1e-5, 'data'), (name, bn.name)
  # one batch_stats entry per batch norm, nothing else
  assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * len(batch_norms)


@pytest.mark.parametrize('name', sorted(CIFAR_FEATURES))
def test_outputs_and_feature_dict(name):
  model = create_model(name, num_classes=10)
  x = _input(name, batch=2)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)

  (logits, features), updates = jax.eval_shape(
      functools.partial(model.apply, train=True, mutable=['batch_stats']), variables, x
  )
  eval_logits, eval_features = jax.eval_shape(
      functools.partial(model.apply, train=False), variables, x
  )

  stage_shapes = CIFAR_FEATURES[name]
  expected_keys = {'embedding'} | (STEMS[name] if name in STEMS else set())
  for i in range(1, len(stage_shapes) + 1):
    expected_keys |= {f'stage{i}', f'stage{i}_preact'}
  assert set(features) == expected_keys
  assert set(eval_features) == expected_keys
  for i, shape in enumerate(stage_shapes, start=1):
    assert features[f'stage{i}'].shape == (2, *shape)
    assert features[f'stage{i}_preact'].shape == (2, *shape)
  assert features['embedding'].shape == (2, EMBEDDING_DIM[name])
  if name in STEMS:
    assert features['stem'].shape == features['stem_preact'].shape == (2, 32, 32, 64)
  assert logits.shape == eval_logits.shape == (2, 10)
  assert logits.dtype == jnp.float32
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = create_model('resnet8', num_classes=10, dtype=jnp.bfloat16)
  x = _input('resnet8', batch=2)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  logits, features = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert logits.dtype == jnp.float32
  assert features['stage3'].dtype == jnp.bfloat16


@pytest.mark.parametrize('name', ['resnet8', 'resnet18'])
def test_train_step_updates_batch_stats_and_preact_relu_is_stage(name):
  model = create_model(name, num_classes=10)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = _random_variables(model, x)

  (logits, features), updates = jax.jit(
      functools.partial(model.apply, train=True, mutable=['batch_stats'])
  )(variables, x)

  assert logits.shape == (4, 10)
  assert set(updates) == {'batch_stats'}
  old_stats = jax.tree.leaves(variables['batch_stats'])
  new_stats = jax.tree.leaves(updates['batch_stats'])
  assert len(old_stats) == len(new_stats)
  assert all(not np.allclose(old, new) for old, new in zip(old_stats, new_stats))
  num_stages = 4 if name == 'resnet18' else 3
  for i in range(1, num_stages + 1):
    preact = features[f'stage{i}_preact']
    assert (preact < 0).any()  # the ReLU does something
    np.testing.assert_array_equal(nn.relu(preact), features[f'stage{i}'])


def test_shufflenetv2_preact_is_shuffled_like_the_output():
  model = create_model('shufflenetv2', num_classes=10)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = _random_variables(model, x)
  _, features = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  for i in (1, 2, 3):
    np.testing.assert_array_equal(nn.relu(features[f'stage{i}_preact']), features[f'stage{i}'])


def test_batch_norm_statistics_are_over_the_global_batch():
  """Sharded over 4 devices with axis_name='data', the batch statistics equal one device's."""
  devices = jax.devices()[:4]
  if len(devices) < 4:
    pytest.skip('needs 4 (emulated) devices')
  mesh = jax.make_mesh((4,), ('data',), devices=devices)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32, 32, 3)), jnp.float32)
  single = create_model('resnet8', num_classes=10)
  sharded = create_model('resnet8', num_classes=10, axis_name='data')
  variables = _random_variables(single, x)

  def train_apply(model, variables, x):
    (logits, _), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits, updates['batch_stats']

  logits, stats = jax.jit(functools.partial(train_apply, single))(variables, x)
  sharded_apply = jax.shard_map(
      functools.partial(train_apply, sharded),
      mesh=mesh,
      in_specs=(P(), P('data')),
      out_specs=(P('data'), P()),
  )
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  sharded_logits, sharded_stats = jax.jit(sharded_apply)(replicated, x_sharded)
  np.testing.assert_allclose(sharded_logits, logits, rtol=1e-4, atol=1e-4)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), sharded_stats, stats
  )


def _numpy_conv_nchw(x_nchw, w_oihw, stride, padding):
  """PyTorch's Conv2d (cross-correlation, symmetric zero padding), written out in NumPy."""
  x = np.pad(x_nchw, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  n, _, h, w = x.shape
  out_channels, _, k, _ = w_oihw.shape
  out_h, out_w = (h - k) // stride + 1, (w - k) // stride + 1
  out = np.zeros((n, out_channels, out_h, out_w), np.float32)
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
      out[:, :, i, j] = np.einsum('nchw,ochw->no', patch, w_oihw)
  return out


@pytest.mark.parametrize('size', [6, 7])
def test_strided_conv_pads_like_pytorch(size):
  rng = np.random.default_rng(0)
  x_nchw = rng.normal(size=(2, 3, size, size)).astype(np.float32)
  w_oihw = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
  conv = layers.conv2d(4, 3, stride=2)
  params = {'params': {'kernel': jnp.asarray(w_oihw.transpose(2, 3, 1, 0))}}
  out = conv.apply(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  expected = _numpy_conv_nchw(x_nchw, w_oihw, stride=2, padding=1).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_channel_shuffle_matches_pytorch_order():
  n, c, h, w, groups = 2, 12, 3, 3, 3
  x_nchw = np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)
  # PyTorch: x.view(N, g, C // g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W)
  expected = x_nchw.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4)
  expected = expected.reshape(n, c, h, w).transpose(0, 2, 3, 1)
  out = layers.channel_shuffle(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), groups)
  np.testing.assert_array_equal(out, expected)
