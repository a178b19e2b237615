"""SOKD: the partial forward it needs, its losses against the authors' code, its branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffkd_jax import checkpoint as checkpoint_lib
from ffkd_jax import methods, models, train
from ffkd_jax.losses import sokd as sokd_losses
from ffkd_jax.methods.base import RoleOutput
from tests import helpers
from tests.test_methods import changed, method_config, run

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


def test_sokd_refuses_a_teacher_without_a_tail():
  config = method_config('sokd')
  config.teacher.model = 'vgg13'
  with pytest.raises(ValueError, match=r"config.teacher.model='vgg13': sokd builds"):
    methods.check_config(config)


# ----------------------------------------------------------------------------------------------
# The losses, against a NumPy transcription of the authors' trainer/sokd.py.


def np_log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_soft_target(out_s, out_t, T):
  """kd_losses/st.py SoftTarget: kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') T^2."""
  log_q = np_log_softmax(out_s / T)
  p = np.exp(np_log_softmax(out_t / T))
  return np.sum(p * (np.log(p) - log_q)) / out_s.shape[0] * T * T


def np_ce(z, labels):
  return -np.mean(np_log_softmax(z)[np.arange(len(labels)), labels])


def np_sokd(out_t, out_s, out_a, labels, T, w):
  """trainer/sokd.py `train` + `calculate_kd('soft_target')`: (loss_A, loss)."""
  loss_kd_t_a = np_soft_target(out_a, out_t, T) * w['branch_kd_teacher_weight']
  loss_kd_s_a = np_soft_target(out_a, out_s, T) * w['branch_kd_student_weight']
  loss_s = np_soft_target(out_s, out_a, T) * w['kd_weight']
  loss_a = np_ce(out_a, labels) * w['branch_ce_weight'] + loss_kd_t_a + loss_kd_s_a
  loss = np_ce(out_s, labels) * w['ce_weight'] + loss_s
  return loss_a, loss


def _random_logits(seed, n=8, classes=helpers.NUM_CLASSES):
  rng = np.random.default_rng(seed)
  t, s, a = (rng.normal(size=(n, classes)) * scale for scale in (4.0, 1.0, 2.0))
  return t, s, a, rng.integers(0, classes, size=n)


def test_kl_terms_match_soft_target_and_stop_their_targets():
  t, s, a, _ = _random_logits(0)
  terms = sokd_losses.sokd_kl_terms(*(jnp.asarray(z, jnp.float32) for z in (t, s, a)), 3.0)
  np.testing.assert_allclose(terms.kd_branch_teacher, np_soft_target(a, t, 3.0), rtol=1e-5)
  np.testing.assert_allclose(terms.kd_branch_student, np_soft_target(a, s, 3.0), rtol=1e-5)
  np.testing.assert_allclose(terms.kd_student, np_soft_target(s, a, 3.0), rtol=1e-5)
  # Each term's gradient reaches its fitted side only.
  z = tuple(jnp.asarray(v, jnp.float32) for v in (t, s, a))
  for index, fitted in (('kd_branch_teacher', 2), ('kd_branch_student', 2), ('kd_student', 1)):
    grads = jax.grad(
        lambda *z, index=index: getattr(sokd_losses.sokd_kl_terms(*z, 3.0), index),
        argnums=(0, 1, 2),
    )(*z)
    for k, g in enumerate(grads):
      assert (float(jnp.abs(g).max()) > 0) == (k == fitted), (index, k)


def _sokd_method(**fields):
  config = method_config('sokd')
  for key, value in fields.items():
    config.sokd[key] = value
  method, _, _ = helpers.build(config)
  return method, config


def test_method_losses_match_the_authors_code_and_each_role_gets_its_own_gradient():
  weights = dict(
      ce_weight=0.7,
      kd_weight=1.3,
      branch_ce_weight=0.4,
      branch_kd_teacher_weight=2.0,
      branch_kd_student_weight=0.6,
  )
  method, _ = _sokd_method(temperature=3.0, **weights)
  t, s, a, labels = _random_logits(1)

  def losses_of(t, s, a):
    outputs = {
        'teacher': RoleOutput(t, {}, {'logits': a}),
        'student': RoleOutput(s, {}, {}),
    }
    return method.loss(outputs, jnp.asarray(labels), jnp.int32(0))

  z = tuple(jnp.asarray(v, jnp.float32) for v in (t, s, a))
  losses, metrics = losses_of(*z)
  want_a, want_s = np_sokd(t, s, a, labels, 3.0, weights)
  np.testing.assert_allclose(losses['teacher'], want_a, rtol=1e-5)
  np.testing.assert_allclose(losses['student'], want_s, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss/branch_ce'], np_ce(a, labels), rtol=1e-5)
  np.testing.assert_allclose(
      metrics['train/branch_top1'], np.mean(np.argmax(a, 1) == labels), rtol=1e-6
  )
  # One backward pass of the sum (as the code's loss_total.backward()): the student's logits
  # get the gradient of L_S alone, the branch's that of L_A alone, the teacher's none.
  total = jax.grad(lambda *z: sum(losses_of(*z)[0].values()), argnums=(0, 1, 2))(*z)
  own_s = jax.grad(lambda s: losses_of(z[0], s, z[2])[0]['student'])(z[1])
  own_a = jax.grad(lambda a: losses_of(z[0], z[1], a)[0]['teacher'])(z[2])
  assert float(jnp.abs(total[0]).max()) == 0.0
  np.testing.assert_allclose(total[1], own_s, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(total[2], own_a, rtol=1e-5, atol=1e-7)


def test_defaults_are_the_authors_cifar100_configuration():
  config = method_config('sokd')
  c = config.sokd
  assert c.temperature == 4.0 and c.branch_lr_scale == 1.0 and c.branch_init == 'random'
  assert all(c[w] == 1.0 for w in ('ce_weight', 'kd_weight', 'branch_ce_weight'))
  assert c.branch_kd_teacher_weight == c.branch_kd_student_weight == 1.0
  roles = {r.name: r for r in methods.method_roles(config)}
  assert not roles['teacher'].train_backbone and roles['teacher'].pretrained
  assert roles['student'].train_backbone and not roles['student'].pretrained
  assert methods.method_class(config).primary_role == 'student'


# ----------------------------------------------------------------------------------------------
# The branch: its input, its initialisation, what trains.


def test_branch_reads_the_teachers_stage2_and_is_its_last_stage():
  method, programs, state = helpers.build(method_config('sokd'))
  assert method.required_features() == {'teacher': ('stage2',)}
  heads = state.roles['teacher'].params['heads']
  backbone = state.roles['teacher'].params['backbone']
  assert sorted(heads) == ['tail'] and sorted(heads['tail']) == ['fc', 'layer3_0']
  assert jax.tree.map(np.shape, heads['tail']) == jax.tree.map(
      np.shape, {k: backbone[k] for k in heads['tail']}
  )
  assert programs['student'].heads is None and programs['teacher'].optimizer is not None
  # A fresh branch ('random', the authors' code) is not the teacher's last stage.
  assert any(changed(heads['tail']['fc'], backbone['fc']))


def _write_ce_teacher(workdir):
  """A CE run's checkpoint of a resnet8 with 10 classes; returns (workdir, its model state)."""
  _, _, state = helpers.build(helpers.tiny_config('ce'))
  state = state.replace(step=jnp.int32(7))
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), 1)
  checkpoints.save(
      state, {'method': 'ce', 'roles': {'model': 'resnet8'}, 'num_classes': helpers.NUM_CLASSES}
  )
  checkpoints.wait()
  checkpoints.close()
  return str(workdir), state.roles['model']


@pytest.mark.parametrize('branch_init', ['random', 'teacher'])
def test_loading_the_teacher_initialises_the_branch_as_configured(tmp_path, branch_init):
  teacher_dir, saved = _write_ce_teacher(tmp_path / 'teacher')
  config = method_config('sokd')
  config.sokd.branch_init = branch_init
  config.teacher.checkpoint = teacher_dir
  method, programs, fresh = helpers.build(config)
  loaded = train._load_teachers(config, method, programs, fresh)  # pylint: disable=protected-access
  teacher = loaded.roles['teacher']
  for a, b in zip(jax.tree.leaves(teacher.params['backbone']), jax.tree.leaves(saved.params)):
    np.testing.assert_array_equal(a, b)
  heads, stats = teacher.params['heads']['tail'], teacher.batch_stats['heads']['tail']
  if branch_init == 'random':
    assert not any(changed(fresh.roles['teacher'].params['heads'], teacher.params['heads']))
  else:  # the loaded teacher's last stage and classifier, parameters and running statistics
    for k in heads:
      assert not any(changed(heads[k], saved.params['backbone'][k])), k
    for k in stats:
      assert not any(changed(stats[k], saved.batch_stats['backbone'][k])), k
    # So at the start the branch gives the teacher's own logits.
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 16, 3)), jnp.float32)
    backbone_vars = {
        'params': teacher.params['backbone'],
        'batch_stats': teacher.batch_stats['backbone'],
    }
    logits, features = programs['teacher'].backbone.apply(backbone_vars, x, train=False)
    branch = programs['teacher'].heads.apply(
        {'params': teacher.params['heads'], 'batch_stats': teacher.batch_stats['heads']},
        features,
        train=False,
    )
    np.testing.assert_allclose(branch['logits'], logits, rtol=1e-5, atol=1e-5)
  # The optimizer state is built on the loaded parameters (the branch: the only trainable part).
  assert jax.tree.structure(teacher.opt_state) == jax.tree.structure(
      programs['teacher'].optimizer.init({'heads': teacher.params['heads']})
  )


def test_the_frozen_teacher_stays_while_the_branch_and_the_student_train():
  config = method_config('sokd')
  config.sokd.branch_init = 'teacher'  # (no checkpoint here: the hook is not run by build)
  _, states, history = run(config, 2)
  before, after = states[0].roles['teacher'], states[-1].roles['teacher']
  assert not any(changed(before.params['backbone'], after.params['backbone']))
  assert not any(changed(before.batch_stats['backbone'], after.batch_stats['backbone']))
  assert all(changed(before.params['heads'], after.params['heads']))
  assert all(changed(before.batch_stats['heads'], after.batch_stats['heads']))  # train-mode BN
  assert any(changed(states[0].roles['student'].params, states[-1].roles['student'].params))
  for metrics in history:
    assert metrics['nonfinite'] == 0
    np.testing.assert_allclose(
        metrics['loss/teacher'],
        metrics['loss/branch_ce']
        + metrics['loss/branch_kd_teacher']
        + metrics['loss/branch_kd_student'],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        metrics['loss/student'], metrics['loss/student_ce'] + metrics['loss/student_kd'], rtol=1e-5
    )
    assert 0 <= metrics['train/branch_top1'] <= 1
    assert metrics['lr/teacher'] == metrics['lr/student'] > 0  # branch_lr_scale 1
