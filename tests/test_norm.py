"""The zoo's batch norm (hand-written training gradient) against Flax's nn.BatchNorm (autodiff)."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ffkd_jax.models import norm

_SETTINGS = dict(momentum=0.9, epsilon=1e-5)


def _variables(rng, channels):
  return {
      'params': {
          'scale': jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
          'bias': jnp.asarray(rng.normal(size=channels), jnp.float32),
      },
      'batch_stats': {
          'mean': jnp.asarray(rng.normal(size=channels), jnp.float32),
          'var': jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32),
      },
  }


def _train_apply(module):
  """(params, x) -> (y, new batch_stats) of a training-mode call."""

  def apply(variables, x):
    y, updates = module.apply(variables, x, mutable=['batch_stats'])
    return y, updates['batch_stats']

  return apply


def _loss_and_grads(module, variables, x, cotangent):
  apply = _train_apply(module)

  def loss(params, x):
    y, stats = apply({'params': params, 'batch_stats': variables['batch_stats']}, x)
    return jnp.sum(y.astype(jnp.float32) * cotangent), (y, stats)

  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables['params'], x
  )
  return y, stats, grads


def _assert_close(got, want, tolerance, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(float(np.abs(want).max()), 1e-6)
  err = float(np.abs(got - want).max()) / scale
  assert err < tolerance, (what, err)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('shape', [(6, 5, 7, 4), (8, 3)])
def test_training_forward_statistics_and_gradients_equal_flax(dtype, shape):
  dtype = jnp.dtype(dtype)
  tolerance = {'float32': 2e-5, 'bfloat16': 2e-2}[dtype.name]
  rng = np.random.default_rng(0)
  channels = shape[-1]
  # A mean far from 0 relative to the spread: where E[x^2] - E[x]^2 loses digits.
  x = jnp.asarray(rng.normal(3.0, 0.7, size=shape), dtype)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  variables = _variables(rng, channels)
  ours = norm.BatchNorm(dtype=dtype, **_SETTINGS)
  flax_bn = nn.BatchNorm(use_running_average=False, dtype=dtype, **_SETTINGS)
  y, stats, (d_params, d_x) = _loss_and_grads(ours, variables, x, cotangent)
  y_f, stats_f, (d_params_f, d_x_f) = _loss_and_grads(flax_bn, variables, x, cotangent)
  assert y.dtype == y_f.dtype == dtype and d_x.dtype == d_x_f.dtype == dtype
  _assert_close(y, y_f, tolerance, 'output')
  for key in ('mean', 'var'):
    _assert_close(stats[key], stats_f[key], 1e-5, key)
  _assert_close(d_x, d_x_f, tolerance, 'input gradient')
  for key in ('scale', 'bias'):
    _assert_close(d_params[key], d_params_f[key], tolerance, key)


@pytest.mark.parametrize('shape,offset', [((4, 3, 3, 5), 0.0), ((32, 8, 8, 5), 10.0)])
def test_the_gradient_against_a_numpy_formula_in_float64(shape, offset):
  """dx = scale / sigma (dy - mean(dy) - xhat mean(dy xhat)), from the definition (Ioffe &
  Szegedy 2015), independently of both implementations; also for activations whose mean is 10
  standard deviations from 0 over 2048 positions (where a one-pass sum(dy x) - mean sum(dy)
  would lose to cancellation; `norm._backward` centres first, see its module docstring)."""
  rng = np.random.default_rng(1)
  x = offset + rng.normal(size=shape)
  dy = rng.normal(size=x.shape)
  scale = rng.uniform(0.5, 1.5, 5)
  variables = _variables(rng, 5)
  variables['params']['scale'] = jnp.asarray(scale, jnp.float32)
  _, _, (d_params, d_x) = _loss_and_grads(
      norm.BatchNorm(**_SETTINGS), variables, jnp.asarray(x, jnp.float32), jnp.asarray(dy)
  )
  axes = (0, 1, 2)
  mean, var = x.mean(axes), x.var(axes)
  xhat = (x - mean) / np.sqrt(var + 1e-5)
  want_dx = scale / np.sqrt(var + 1e-5) * (dy - dy.mean(axes) - xhat * (dy * xhat).mean(axes))
  np.testing.assert_allclose(np.asarray(d_x), want_dx, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(d_params['scale']), (dy * xhat).sum(axes), rtol=2e-4)
  np.testing.assert_allclose(np.asarray(d_params['bias']), dy.sum(axes), rtol=2e-5)


def test_running_averages_evaluation_and_initialisation_equal_flax():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(5, 4, 4, 3)), jnp.float32)
  ours, flax_bn = norm.BatchNorm(**_SETTINGS), nn.BatchNorm(use_running_average=False, **_SETTINGS)
  init, init_f = ours.init(jax.random.key(0), x), flax_bn.init(jax.random.key(0), x)
  # Initialising leaves the running statistics at (0, 1), as Flax does.
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, init_f)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(init_f)):
    np.testing.assert_array_equal(a, b)
  variables = _variables(rng, 3)
  _, stats = _train_apply(ours)(variables, x)
  axes = (0, 1, 2)
  np.testing.assert_allclose(
      stats['mean'],
      0.9 * variables['batch_stats']['mean'] + 0.1 * np.asarray(x).mean(axes),
      rtol=1e-5,
  )
  np.testing.assert_allclose(  # the biased batch variance, as Flax keeps it
      stats['var'],
      0.9 * variables['batch_stats']['var'] + 0.1 * np.asarray(x).var(axes),
      rtol=1e-5,
  )
  evaluate = norm.BatchNorm(use_running_average=True, **_SETTINGS)
  evaluate_f = nn.BatchNorm(use_running_average=True, **_SETTINGS)
  np.testing.assert_allclose(
      evaluate.apply(variables, x), evaluate_f.apply(variables, x), rtol=1e-6, atol=1e-6
  )
  with pytest.raises(ValueError, match=r'\(n, h, w, c\) or \(n, c\)'):
    ours.init(jax.random.key(0), jnp.ones((2, 3, 4)))


def test_global_statistics_and_gradients_under_shard_map_equal_flax():
  """With axis_name, the statistics are the global batch's and the parameters' gradients the
  sum over devices: 4 devices against Flax's BatchNorm under the same shard_map, and against one
  device holding the whole batch."""
  devices = jax.devices()[:4]
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 3, 3, 6)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _variables(rng, 6)

  def run(module, sharded):
    def per_device(variables, x, cotangent):
      y, stats, grads = _loss_and_grads(module, variables, x, cotangent)
      return y, stats, grads

    if not sharded:
      return jax.jit(per_device)(variables, x, cotangent)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))
    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P('data'), P('data')),
        out_specs=(P('data'), P(), (P(), P('data'))),
    )
    return jax.jit(fn)(variables, put(x), put(cotangent))

  ours = run(norm.BatchNorm(axis_name='data', **_SETTINGS), True)
  flax_bn = run(nn.BatchNorm(use_running_average=False, axis_name='data', **_SETTINGS), True)
  whole = run(norm.BatchNorm(**_SETTINGS), False)
  for reference in (flax_bn, whole):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('name', ['resnet8', 'wrn_16_2'])
def test_a_whole_models_training_gradients_equal_flax_and_xla(name, monkeypatch):
  """The zoo's train path (norm.BatchNorm, conv_impl='auto') against the plain one (Flax's
  nn.BatchNorm, XLA's convolutions): the same loss, gradients and batch statistics."""
  from ffkd_jax import models  # pylint: disable=g-import-not-at-top
  from ffkd_jax.models import conv, layers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 6))

  def run(plain):
    if plain:
      monkeypatch.setattr(
          layers,
          'batch_norm',
          lambda train, axis_name, dtype=jnp.float32, name=None: nn.BatchNorm(
              use_running_average=not train,
              axis_name=axis_name,
              dtype=dtype,
              name=name,
              **_SETTINGS,
          ),
      )
    model = models.create_model(name, 10)
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
      (logits, _), updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          x,
          train=True,
          mutable=['batch_stats'],
      )
      one_hot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), updates

    with conv.using('xla' if plain else 'auto'):
      return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

  (value, stats), grads = run(plain=False)
  (value_f, stats_f), grads_f = run(plain=True)
  np.testing.assert_allclose(value, value_f, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_f)
  for a, b in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((grads_f, stats_f))):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(float(np.abs(b).max()), 1e-6))
