"""The methods around FFKD behind the one distiller interface: two data-parallel steps each."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import cifar100_distill
from ffkd_jax import config_checks, methods, parallel
from ffkd_jax import step as step_lib
from ffkd_jax.methods import common, pairs
from ffkd_jax.methods import ffkd as ffkd_method
from ffkd_jax.losses.classification import cross_entropy, softened_kl, standardize_logits
from ffkd_jax.methods.base import RoleOutput
from tests import helpers

# Every registered method but CE (the FFKD presets have their own tests in test_step.py).
METHODS = tuple(
    m for m in methods.available_methods() if m != 'ce' and m not in ffkd_method.PRESETS
)
# Online methods: every role trained from scratch.
ONLINE = tuple(
    m
    for m in METHODS
    if not any(r.pretrained for r in methods.method_roles(helpers.tiny_config(m)))
)


def method_config(method):
  config = helpers.tiny_config(method)
  # Without weight decay a parameter moves only where a gradient reaches it.
  config.optimizer.weight_decay = 0.0
  # IE: the auto-encoders train at step 0, the inheritance / exploration terms start at step 1.
  config.iekd.ae_steps = 1
  config.iedml.ae_steps = 1
  # DKD, ReviewKD: half its weight at step 0, all of it from step 1.
  config.dkd.warmup_steps = 2
  config.reviewkd.warmup_steps = 2
  return config


def run(config, num_devices, num_steps=2, batch_size=16):
  """(programs, [state before step 0, after step 0, ...] on the host, [metrics per step])."""
  method, programs, state = helpers.build(config)
  mesh = helpers.mesh_of(num_devices)
  train_step = step_lib.make_train_step(method, programs, mesh)
  states = [jax.tree.map(np.asarray, state)]
  state = parallel.replicate(mesh, state)
  history = []
  for i in range(num_steps):
    batch = parallel.global_batch(mesh, helpers.random_batch(i, batch_size))
    state, metrics = train_step(state, batch)
    states.append(parallel.fetch(state))
    history.append(parallel.fetch(metrics))
  return programs, states, history


@functools.lru_cache(maxsize=None)
def two_device_run(method):
  return run(method_config(method), 2)


def changed(before, after) -> list[bool]:
  """Per leaf: whether it changed."""
  return [
      not np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
  ]


@pytest.mark.parametrize('method', METHODS)
def test_two_steps_on_two_devices(method):
  programs, states, history = two_device_run(method)
  initial, final = states[0], states[-1]
  for metrics in history:
    assert metrics['nonfinite'] == 0
    losses = {k: v for k, v in metrics.items() if k.startswith('loss')}
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
  for name, program in programs.items():
    before, after = initial.roles[name], final.roles[name]
    if program.role.train_backbone:
      assert any(changed(before.params['backbone'], after.params['backbone'])), name
    else:  # a frozen backbone: parameters and batch statistics untouched
      assert not any(changed(before.params['backbone'], after.params['backbone'])), name
      assert not any(changed(before.batch_stats['backbone'], after.batch_stats['backbone']))
    if program.heads is not None:  # every head parameter receives a gradient
      assert all(changed(before.params['heads'], after.params['heads'])), name
    if program.optimizer is None:
      assert after.opt_state == ()
  if method in ONLINE:
    assert all(
        program.role.train_backbone and not program.role.pretrained for program in programs.values()
    )
    assert methods.method_class(method_config(method)).primary_role == 'peer0'
  else:
    assert not programs['teacher'].role.train_backbone and programs['teacher'].role.pretrained


@pytest.mark.parametrize('method', METHODS)
def test_eval_and_diagnostics_steps(method):
  """Each method's eval and diagnostics steps on its trained state: finite, on the global batch."""
  programs, states, _ = two_device_run(method)
  method_obj, _, _ = helpers.build(method_config(method))
  mesh = helpers.mesh_of(2)
  state = parallel.replicate(mesh, states[-1])
  batch = dict(helpers.random_batch(5, 16), mask=np.ones((16,), np.float32))
  batch = parallel.global_batch(mesh, batch)
  counts = parallel.fetch(step_lib.make_eval_step(programs, mesh)(state, batch))
  assert counts['count'] == 16
  for name in programs:
    assert 0 <= counts[f'{name}_top1'] <= counts[f'{name}_top5'] <= 16
  diagnostics = parallel.fetch(
      step_lib.make_diagnostics_step(method_obj, programs, mesh)(state, batch)
  )
  assert diagnostics
  for key, value in diagnostics.items():
    assert np.all(np.isfinite(value)), key
  if 'teacher' in programs:
    matrix = diagnostics['cka_matrix']
    assert matrix.shape == (3, 3) and np.all((matrix > -1e-5) & (matrix < 1 + 1e-5))


def test_iekd_trains_the_autoencoder_first_then_the_student_on_its_own_schedule():
  """As the official code: the auto-encoder alone for ae_steps (the student untouched), then the
  student with inheritance and exploration, the auto-encoder fixed; the student's learning rate
  is its schedule from its own start, and the run is ae_steps longer."""
  programs, (initial, after_ae, final), (first, second) = two_device_run('iekd')
  # Step 0 (< ae_steps = 1): only the auto-encoder trains.
  assert 'loss/student' not in first and first['loss/teacher_reconstruction'] > 0
  assert first['lr/student'] == 0.0
  assert not any(changed(initial.roles['student'], after_ae.roles['student']))
  assert all(
      changed(initial.roles['teacher'].params['heads'], after_ae.roles['teacher'].params['heads'])
  )
  # Step 1: the student, inheritance and exploration on; the auto-encoder stays fixed.
  assert 'loss/teacher' not in second and second['lr/teacher'] == 0.0
  assert second['loss/student_inheritance'] > 0 and second['loss/student_exploration'] < 0
  assert all(
      changed(after_ae.roles['student'].params['heads'], final.roles['student'].params['heads'])
  )
  assert not any(changed(after_ae.roles['teacher'], final.roles['teacher']))
  # The student's schedule starts at its start: at global step ae_steps + k it is at step k.
  config = method_config('iekd')
  config.iekd.ae_steps = 5
  config.optimizer.schedule = 'cosine'
  _, programs, _ = helpers.build(config, steps_per_epoch=10, total_steps=20)
  student, teacher = programs['student'].schedule, programs['teacher'].schedule
  for k in (0, 3, 12):
    assert float(student(5 + k)) == pytest.approx(float(teacher(k)))
  assert methods.method_class(config).steps_before_schedule(config) == 5


def test_iedml_starts_inheritance_and_exploration_at_ae_steps():
  _, _, (first, second) = two_device_run('iedml')
  for peer in ('peer0', 'peer1'):
    assert first[f'loss/{peer}_inheritance'] == 0 and first[f'loss/{peer}_exploration'] == 0
    assert second[f'loss/{peer}_inheritance'] > 0 and second[f'loss/{peer}_exploration'] < 0
    assert first[f'loss/{peer}_kl'] > 0 and first[f'loss/{peer}_reconstruction'] > 0


def test_rkd_two_devices_equal_one_device():
  """The RKD terms are statistics over the (gathered) global batch."""
  _, states_2, history_2 = two_device_run('rkd')
  _, states_1, history_1 = run(method_config('rkd'), 1)
  flat_1 = jax.tree_util.tree_leaves_with_path(states_1[-1])
  flat_2 = dict(jax.tree_util.tree_leaves_with_path(states_2[-1]))
  for path, leaf in flat_1:
    np.testing.assert_allclose(
        flat_2[path], leaf, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path)
    )
  for m1, m2 in zip(history_1, history_2):
    for key in m1:
      np.testing.assert_allclose(m2[key], m1[key], rtol=1e-4, atol=1e-5, err_msg=key)


def assert_same_runs(run_a, run_b):
  """Two runs' final states and per-step metrics agree."""
  (_, states_a, history_a), (_, states_b, history_b) = run_a, run_b
  flat_a = jax.tree_util.tree_leaves_with_path(states_a[-1])
  flat_b = dict(jax.tree_util.tree_leaves_with_path(states_b[-1]))
  for path, leaf in flat_a:
    np.testing.assert_allclose(
        flat_b[path], leaf, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path)
    )
  for m_a, m_b in zip(history_a, history_b):
    for key in m_a:
      np.testing.assert_allclose(m_b[key], m_a[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize('method', ['dkd', 'cd', 'ccs', 'reviewkd', 'crd', 'kdcl', 'sokd'])
def test_four_devices_equal_one_device(method):
  """Local means (CE, DKD) and global-batch terms alike: 4 devices x 4 rows == 1 x 16 (CRD:
  its memory and Z too)."""
  assert_same_runs(run(method_config(method), 1), run(method_config(method), 4))


def test_dkd_warms_up_per_step():
  _, _, (first, second) = two_device_run('dkd')
  assert first['dkd/warmup'] == 0.5 and second['dkd/warmup'] == 1.0
  assert first['loss/student_dkd'] > 0
  np.testing.assert_allclose(
      first['loss/student'], first['loss/student_ce'] + 0.5 * first['loss/student_dkd'], rtol=1e-5
  )
  method = methods.create_method(cifar100_distill.get_config('dkd'), {'teacher': {}, 'student': {}})
  assert float(method.warmup(jnp.int32(0))) == pytest.approx(1 / 15640)
  assert float(method.warmup(jnp.int32(15639))) == 1.0
  assert float(method.warmup(jnp.int32(10**6))) == 1.0


def test_cd_pairs_embeds_and_early_decay():
  _, states, (first, _) = two_device_run('cd')
  assert 0 <= first['cd/teacher_correct'] <= 1 and first['loss/student_cd'] > 0
  assert first['cd/weight'] == 1.0  # no EDT by default
  # One embedding (1x1 conv without bias + batch norm) per aligned stage pair.
  heads = states[0].roles['student'].params['heads']
  assert sorted(heads) == [f'connector_stage{k}-stage{k}' for k in (1, 2, 3)]
  assert sorted(heads['connector_stage1-stage1']['conv']) == ['kernel']
  config = method_config('cd')
  shapes = {'teacher': _shapes((8, 8), (4, 16)), 'student': _shapes((8, 4), (4, 8))}
  config.cd.edt, config.cd.edt_boundary_steps = True, (10, 20)
  method = methods.create_method(config, shapes)
  weights = [float(method.cd_weight_at(jnp.int32(s))) for s in (0, 9, 10, 19, 20, 10**6)]
  np.testing.assert_allclose(weights, [1, 1, 0.9, 0.9, 0.81, 0.81], rtol=1e-6)
  assert method.layer_pairs == (('stage1', 'stage1'), ('stage2', 'stage2'))
  defaults = cifar100_distill.get_config('cd').cd
  assert (defaults.edt, defaults.edt_factor, tuple(defaults.edt_boundary_steps)) == (
      False,
      0.9,
      (60 * 782, 160 * 782),
  )


def test_ccs_embeds_every_aligned_stage_pair():
  _, states, (first, _) = two_device_run('ccs')
  assert first['loss/student_ccs'] > 0 and first['loss/student_kd'] > 0
  heads = states[0].roles['student'].params['heads']
  assert sorted(heads) == [f'connector_stage{k}-stage{k}' for k in (1, 2, 3)]
  assert sorted(heads['connector_stage3-stage3']) == ['bn', 'conv']
  assert sorted(heads['connector_stage3-stage3']['conv']) == ['kernel']  # no bias


def _outputs(logits_by_role):
  return {name: RoleOutput(jnp.asarray(z), {}, {}) for name, z in logits_by_role.items()}


def _logit_method(method, standardize):
  config = method_config(method)
  config.logit_standardization = standardize
  roles = methods.method_roles(config)
  return methods.create_method(config, {r.name: {} for r in roles})


def test_kd_with_logit_standardization_is_kd_of_standardized_logits():
  rng = np.random.default_rng(3)
  teacher = rng.normal(size=(8, 10)).astype(np.float32) * 5
  student = rng.normal(size=(8, 10)).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=(8,)))
  step = jnp.int32(0)
  temperature = method_config('kd').kd.temperature
  off = _logit_method('kd', False)
  on = _logit_method('kd', True)
  assert not off.logit_standardization and on.logit_standardization
  outputs = _outputs({'teacher': teacher, 'student': student})
  # Off: plain KD, unchanged.
  losses, metrics = off.loss(outputs, labels, step)
  np.testing.assert_allclose(
      metrics['loss/student_kd'], softened_kl(teacher, student, temperature), rtol=1e-6
  )
  # On: KD of the standardized logits, CE of the raw ones.
  losses_on, metrics_on = on.loss(outputs, labels, step)
  standardized = softened_kl(standardize_logits(teacher), standardize_logits(student), temperature)
  np.testing.assert_allclose(metrics_on['loss/student_kd'], standardized, rtol=1e-5)
  np.testing.assert_allclose(metrics_on['loss/student_ce'], cross_entropy(student, labels))
  assert abs(float(metrics_on['loss/student_kd']) - float(metrics['loss/student_kd'])) > 1e-3
  kd_config = method_config('kd').kd
  np.testing.assert_allclose(
      losses_on['student'],
      kd_config.ce_weight * cross_entropy(student, labels) + kd_config.kd_weight * standardized,
      rtol=1e-5,
  )


@pytest.mark.parametrize(
    'method, phase, roles, distillation_keys',
    [
        ('dkd', 'loss', ('teacher', 'student'), ('loss/student_dkd',)),
        ('dist', 'loss', ('teacher', 'student'), ('loss/student_dist',)),
        ('dml', 'loss', ('peer0', 'peer1'), ('loss/peer0_kl', 'loss/peer1_kl')),
        ('fkd', 'student_loss', ('teacher', 'student'), ('loss/student_kd',)),
        ('fkd', 'teacher_loss', ('teacher', 'student'), ('loss/teacher_kd',)),
    ],
)
def test_logit_standardization_switches_every_logit_term(method, phase, roles, distillation_keys):
  """On: each distillation term equals the term of the standardized logits with the switch
  off; every other metric (CE, ...) is that of the raw logits."""
  rng = np.random.default_rng(4)
  logits = {
      r: rng.normal(size=(8, 10)).astype(np.float32) * (1 + 3 * k) for k, r in enumerate(roles)
  }
  standardized = {r: np.asarray(standardize_logits(z)) for r, z in logits.items()}
  labels = jnp.asarray(rng.integers(0, 10, size=(8,)))
  on, off = _logit_method(method, True), _logit_method(method, False)
  mesh = helpers.mesh_of(1)  # dist gathers over the data axis

  def metrics_of(m, z):
    loss = lambda z: getattr(m, phase)(_outputs(z), labels, jnp.int32(5))[1]
    return jax.jit(jax.shard_map(loss, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))(z)

  raw_on, raw_off, standardized_off = (
      metrics_of(on, logits),
      metrics_of(off, logits),
      metrics_of(off, standardized),
  )
  for key in raw_on:
    expected = standardized_off[key] if key in distillation_keys else raw_off[key]
    np.testing.assert_allclose(raw_on[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
  for key in distillation_keys:
    assert abs(float(raw_on[key]) - float(raw_off[key])) > 1e-4, key


def test_dml_with_three_peers():
  config = method_config('dml')
  config.dml.models = 'resnet8,resnet14,resnet8'
  method, _, _ = helpers.build(config)
  assert [(r.name, r.model, r.train_backbone, r.pretrained) for r in method.roles()] == [
      ('peer0', 'resnet8', True, False),
      ('peer1', 'resnet14', True, False),
      ('peer2', 'resnet8', True, False),
  ]
  rng = np.random.default_rng(0)
  logits = {f'peer{k}': rng.normal(size=(8, 10)).astype(np.float32) for k in range(3)}
  labels = jnp.asarray(rng.integers(0, 10, size=(8,)))

  def total(logits):
    losses, _ = method.loss(_outputs(logits), labels, jnp.int32(0))
    return sum(losses.values()), losses

  grads, losses = jax.grad(total, has_aux=True)(logits)
  assert set(losses) == {'peer0', 'peer1', 'peer2'}
  # The summed objective gives each peer the gradient of its own loss only.
  for k in range(3):
    own = jax.grad(
        lambda z, k=k: method.loss(_outputs({**logits, f'peer{k}': z}), labels, jnp.int32(0))[0][
            f'peer{k}'
        ]
    )(logits[f'peer{k}'])
    np.testing.assert_allclose(grads[f'peer{k}'], own, rtol=1e-5, atol=1e-7)


def test_peer_lists_are_checked():
  config = method_config('dml')
  config.dml.models = 'resnet8,resnet_nope'
  with pytest.raises(ValueError, match='config.dml.models'):
    methods.check_config(config)
  config.dml.models = 'resnet8'
  with pytest.raises(ValueError, match='at least 2'):
    methods.check_config(config)
  config = method_config('iedml')
  config.iedml.models = 'resnet8,resnet8,resnet8'
  with pytest.raises(ValueError, match='exactly 2'):
    methods.check_config(config)


def _shapes(*sizes_and_channels):
  return {
      f'stage{i}': jax.ShapeDtypeStruct((2, hw, hw, c), jnp.float32)
      for i, (hw, c) in enumerate(sizes_and_channels, start=1)
  }


def test_stage_pairs_align_at_the_deepest_stage():
  resnet = _shapes((32, 16), (16, 32), (8, 64))
  mobilenet = _shapes((16, 12), (8, 16), (4, 48), (2, 160))
  assert pairs.aligned_stage_pairs(resnet, mobilenet) == (
      ('stage1', 'stage2'),
      ('stage2', 'stage3'),
      ('stage3', 'stage4'),
  )


def test_vgg_pairs_the_four_stages_after_its_stem():
  """RepDistiller's and mdistiller's feat[1:-1] on vgg -> vgg: the 4 blocks after block0."""
  config = helpers.tiny_config('at', model='vgg8', teacher='vgg13')
  method, _, _ = helpers.build(config)
  assert method.layer_pairs == tuple((f'stage{i}', f'stage{i}') for i in range(1, 5))
  shapes = method.feature_shapes['teacher']
  assert 'stem' in shapes and shapes['stem'].shape[1:] == (16, 16, 64)  # 16x16 test images
  assert pairs.stage_names(shapes) == ['stage1', 'stage2', 'stage3', 'stage4']
  assert common.common_size((8, 8), (4, 4), 'x') == (4, 4)
  with pytest.raises(ValueError, match='6x6'):
    common.common_size((6, 6), (4, 4), 'x')
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  pooled = common.pool_to(x, (2, 2))
  np.testing.assert_allclose(pooled[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)))


def test_unknown_layer_names_name_the_field():
  config = method_config('at')
  config.at.layer_pairs = 'stage3:stage9'
  with pytest.raises(ValueError, match=r'config.at.layer_pairs.*stage9'):
    helpers.build(config)


@pytest.mark.parametrize('method', METHODS)
def test_cifar100_distill_config(method):
  config = cifar100_distill.get_config(f'{method},resnet32x4,resnet8x4')
  config_checks.validate(config)
  assert config.method == method and config.model == 'resnet8x4'
  roles = {r.name: r for r in methods.method_roles(config)}
  if method in ONLINE:
    assert (roles['peer0'].model, roles['peer1'].model) == ('resnet8x4', 'resnet32x4')
  else:
    assert (roles['teacher'].model, roles['student'].model) == ('resnet32x4', 'resnet8x4')


def test_registry_lists_every_method_and_presets():
  assert set(METHODS) >= {
      'kd',
      'dkd',
      'dist',
      'rkd',
      'cc',
      'fitnet',
      'at',
      'sp',
      'ickd',
      'iekd',
      'cd',
      'ccs',
      'reviewkd',
      'sokd',
  }
  assert set(ONLINE) == {'dml', 'kdcl', 'iedml'}


def test_a_created_method_is_resolved_and_immutable():
  method, _, _ = helpers.build(method_config('at'))
  assert method.layer_pairs == (('stage1', 'stage1'), ('stage2', 'stage2'), ('stage3', 'stage3'))
  assert method.required_features() == {
      'teacher': ('stage1', 'stage2', 'stage3'),
      'student': ('stage1', 'stage2', 'stage3'),
  }
  with pytest.raises(dataclasses.FrozenInstanceError, match='immutable'):
    method.layer_pairs = ()


def test_resolve_pairs_parses_checks_and_pairs_automatically():
  shapes = {'teacher': _shapes((8, 4), (4, 8)), 'student': _shapes((8, 2), (4, 4))}
  assert pairs.resolve_pairs('auto', 'x.pairs', shapes, pairs.last_stage_pair) == (
      ('stage2', 'stage2'),
  )
  assert pairs.resolve_pairs(' stage1:stage2 ', 'x.pairs', shapes, pairs.last_stage_pair) == (
      ('stage1', 'stage2'),
  )
  with pytest.raises(ValueError, match=r"config.x.pairs='stage1'"):
    pairs.resolve_pairs('stage1', 'x.pairs', shapes, pairs.last_stage_pair)
  with pytest.raises(ValueError, match=r"config.x.pairs: feature 'stage7' of the student"):
    pairs.resolve_pairs('stage1:stage7', 'x.pairs', shapes, pairs.last_stage_pair)
  with pytest.raises(ValueError, match='exactly 1'):
    pairs.resolve_pairs('stage1:stage1,stage2:stage2', 'x.pairs', shapes, pairs.last_stage_pair, 1)
  assert pairs.stage_names({'stage10': 0, 'stage2': 0, 'stage2_preact': 0, 'embedding': 0}) == [
      'stage2',
      'stage10',
  ]


def test_fitnet_regresses_through_convreg_onto_the_teacher_shape():
  """RepDistiller's ConvReg for the hint: conv (with bias) + batch norm + ReLU, onto the
  teacher's full map; a student map half the teacher's side gets the transposed conv."""
  config = method_config('fitnet')
  config.fitnet.layer_pair = 'stage2:stage3'  # teacher 8x8x32 <- student 4x4x64 (16x16 images)
  method, programs, state = helpers.build(config)
  heads = state.roles['student'].params['heads']['regressor_stage2-stage3']
  assert sorted(heads) == ['bn', 'conv'] and heads['conv']['kernel'].shape == (4, 4, 32, 64)
  features = {
      'stage3': jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 4, 64)), jnp.float32)
  }
  out = programs['student'].heads.apply(
      {
          'params': state.roles['student'].params['heads'],
          'batch_stats': state.roles['student'].batch_stats['heads'],
      },
      features,
      train=False,
  )['stage2-stage3']
  assert out.shape == (4, 8, 8, 32) and float(jnp.min(out)) >= 0.0  # the ReLU
  assert method.layer_pair == ('stage2', 'stage3')


def test_kdcl_losses_match_the_reference():
  """Each peer's loss: alpha CE + gamma tau^2 KL to the mean-logit ensemble (tests/test_losses.py
  transcribes wp502/SKD-RSL's loop), here through the method with other weights."""
  from tests.test_losses import np_kdcl_losses  # pylint: disable=g-import-not-at-top

  config = method_config('kdcl')
  config.kdcl.alpha, config.kdcl.gamma, config.kdcl.temperature = 0.5, 2.0, 3.0
  method, _, _ = helpers.build(config)
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 8, helpers.NUM_CLASSES)).astype(np.float32) * 2
  labels = rng.integers(0, helpers.NUM_CLASSES, size=8)
  outputs = {f'peer{k}': RoleOutput(jnp.asarray(logits[k]), {}, {}) for k in range(2)}
  losses, _ = method.loss(outputs, jnp.asarray(labels), jnp.int32(0))
  want = np_kdcl_losses(logits.astype(np.float64), labels, 3.0, 0.5, 2.0)
  for k in range(2):
    np.testing.assert_allclose(float(losses[f'peer{k}']), want[k][0], rtol=1e-5)


def test_dml_alternating_updates_one_peer_per_phase():
  """'alternating': one phase a peer, in order, each training its peer and reading the others
  (the generic phase order is tested in test_step.py: a phase reads the state the phases before
  it left); its updates differ from the synchronous ones."""
  results = {}
  for mode in ('synchronous', 'alternating'):
    config = method_config('dml')
    config.dml.peer_updates = mode
    method, _, _ = helpers.build(config)
    phases = method.phases()
    if mode == 'alternating':
      assert [(p.trains, set(p.members)) for p in phases] == [
          (('peer0',), {'peer0', 'peer1'}),
          (('peer1',), {'peer0', 'peer1'}),
      ]
    else:
      assert len(phases) == 1 and phases[0].trains == ('peer0', 'peer1')
    _, states, _ = run(config, 1, num_steps=1)
    results[mode] = states[1]
  sync, alt = results['synchronous'], results['alternating']
  assert any(changed(sync.roles['peer1'].params, alt.roles['peer1'].params))
