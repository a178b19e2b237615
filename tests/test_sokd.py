"""The partial forward of the CIFAR ResNets and WRNs (models.create_tail)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffkd_jax import models
from tests import helpers

# ----------------------------------------------------------------------------------------------
# The partial forward (models.create_tail).


@pytest.mark.parametrize('name', ['resnet8', 'resnet14', 'resnet8x4', 'wrn_16_1', 'wrn_40_1'])
@pytest.mark.parametrize('train_mode', [False, True])
def test_tail_on_the_models_own_inner_map_gives_its_logits(name, train_mode):
  """The last stage + pool + classifier on the full model's stage2, with the full model's
  variables of those names, give the full model's logits, embedding and stage3 (batch
  statistics included: in training mode they depend on the stage's input only)."""
  model = models.create_model(name, helpers.NUM_CLASSES)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  # Non-trivial running statistics, so that inference mode reads them.
  variables = {
      'params': variables['params'],
      'batch_stats': jax.tree.map(
          lambda s: s + 0.1 * jnp.arange(s.size, dtype=s.dtype).reshape(s.shape) / s.size,
          variables['batch_stats'],
      ),
  }
  apply_kwargs = {'mutable': ['batch_stats']} if train_mode else {}
  full = model.apply(variables, x, train=train_mode, **apply_kwargs)
  logits, features = full[0] if train_mode else full
  tail = models.create_tail(name, helpers.NUM_CLASSES)
  assert tail.first_stage == 3
  template = jax.eval_shape(lambda: tail.init(jax.random.key(1), features['stage2'], train=False))
  assert set(template['params']) < set(variables['params'])  # a strict part of the model
  own = {c: {k: variables[c][k] for k in template[c]} for c in template}
  out = tail.apply(own, features['stage2'], train=train_mode, **apply_kwargs)
  tail_logits, tail_features = out[0] if train_mode else out
  assert sorted(tail_features) == ['embedding', 'stage3', 'stage3_preact']
  np.testing.assert_allclose(tail_logits, logits, rtol=1e-5, atol=1e-5)
  for key in tail_features:
    np.testing.assert_allclose(tail_features[key], features[key], rtol=1e-5, atol=1e-5)
  if train_mode:  # the tail's updated statistics are the model's, for its own layers
    for k in template['batch_stats']:
      for a, b in zip(
          jax.tree.leaves(out[1]['batch_stats'][k]), jax.tree.leaves(full[1]['batch_stats'][k])
      ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tail_of_a_model_without_one_names_the_field():
  with pytest.raises(ValueError, match=r"config.teacher.model='vgg13' has no partial forward"):
    models.create_tail('vgg13', 10, field='config.teacher.model')
  with pytest.raises(ValueError, match='unknown model'):
    models.create_tail('resnet_nope', 10)
  assert 'resnet110' in models.tail_models() and 'wrn_40_2' in models.tail_models()
  assert 'mobilenetv2' not in models.tail_models()
  with pytest.raises(ValueError, match=r'first_stage=4 is not a stage'):
    bad = models.create_model('resnet8', 10).clone(first_stage=4)
    bad.init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)), train=False)
