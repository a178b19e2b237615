"""The data-parallel FFKD step: devices, gradients, freezing, compilation, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ffkd_jax import parallel
from ffkd_jax import step as step_lib
from ffkd_jax.methods import ffkd as ffkd_method
from tests import helpers


def run_steps(config, num_devices, num_steps=2, batch_size=16):
  method, programs, state = helpers.build(config)
  mesh = helpers.mesh_of(num_devices)
  train_step = step_lib.make_train_step(method, programs, mesh)
  state = parallel.replicate(mesh, state)
  history = []
  for i in range(num_steps):
    batch = parallel.global_batch(mesh, helpers.random_batch(i, batch_size))
    state, metrics = train_step(state, batch)
    history.append(parallel.fetch(metrics))
  return parallel.fetch(state), history, train_step


@pytest.mark.parametrize('method', ['ffkd', 'ce'])
def test_four_devices_equal_one_device(method):
  config = helpers.tiny_config(method)
  state_1, metrics_1, _ = run_steps(config, 1)
  state_4, metrics_4, _ = run_steps(config, 4)
  flat_1 = jax.tree_util.tree_leaves_with_path(state_1)
  flat_4 = dict(jax.tree_util.tree_leaves_with_path(state_4))
  for path, leaf in flat_1:
    np.testing.assert_allclose(
        flat_4[path], leaf, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path)
    )
  for m1, m4 in zip(metrics_1, metrics_4):
    for key in m1:
      np.testing.assert_allclose(m4[key], m1[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_combined_backward_equals_separate_gradients():
  """One backward pass of L_S + L_T gives dL_S/dstudent and dL_T/dteacher exactly."""
  config = helpers.tiny_config('ffkd')
  method, programs, state = helpers.build(config)
  mesh = helpers.mesh_of(1)
  batch = parallel.global_batch(mesh, helpers.random_batch(0))
  state = parallel.replicate(mesh, state)

  def losses_of(params_by_role, batch):
    outputs = {}
    for name, program in programs.items():
      outputs[name], _ = step_lib.forward(
          program, params_by_role[name], state.roles[name].batch_stats, batch['image'], train=True
      )
    losses, _ = method.loss(outputs, batch['label'], jnp.int32(0))
    return losses

  def grads(params_by_role, batch):
    combined = jax.grad(lambda p: sum(losses_of(p, batch).values()))(params_by_role)
    student_only = jax.grad(lambda p: losses_of(p, batch)['student'])(params_by_role)
    teacher_only = jax.grad(lambda p: losses_of(p, batch)['teacher'])(params_by_role)
    return combined, student_only, teacher_only

  params = {name: s.params for name, s in state.roles.items()}
  combined, student_only, teacher_only = jax.jit(
      jax.shard_map(grads, mesh=mesh, in_specs=(P(), P('data')), out_specs=P())
  )(params, batch)
  combined, student_only, teacher_only = parallel.fetch((combined, student_only, teacher_only))
  for a, b in zip(jax.tree.leaves(combined['student']), jax.tree.leaves(student_only['student'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(combined['teacher']), jax.tree.leaves(teacher_only['teacher'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The feedback loss does reach the teacher, and the forward loss does not.
  assert max(np.abs(x).max() for x in jax.tree.leaves(teacher_only['teacher'])) > 0
  assert max(np.abs(x).max() for x in jax.tree.leaves(student_only['teacher'])) == 0
  assert max(np.abs(x).max() for x in jax.tree.leaves(teacher_only['student'])) == 0


@pytest.mark.parametrize('preset', ['fkd', 'fkd_cka'])
def test_teacher_frozen_without_feedback(preset):
  config = helpers.tiny_config(preset)
  _, _, initial = helpers.build(config)
  final, metrics, _ = run_steps(config, 2, num_steps=2)
  assert final.roles['teacher'].opt_state == ()
  for a, b in zip(
      jax.tree.leaves(initial.roles['teacher']), jax.tree.leaves(final.roles['teacher'])
  ):
    np.testing.assert_array_equal(np.asarray(a), b)
  # ... while the student did move.
  moved = [
      np.abs(np.asarray(a) - b).max()
      for a, b in zip(
          jax.tree.leaves(initial.roles['student'].params),
          jax.tree.leaves(final.roles['student'].params),
      )
  ]
  assert max(moved) > 0
  assert 'loss/teacher' not in metrics[-1]


def test_teacher_updates_with_feedback():
  config = helpers.tiny_config('ffkd')
  _, _, initial = helpers.build(config)
  final, _, _ = run_steps(config, 2, num_steps=1)
  moved = [
      np.abs(np.asarray(a) - b).max()
      for a, b in zip(
          jax.tree.leaves(initial.roles['teacher'].params),
          jax.tree.leaves(final.roles['teacher'].params),
      )
  ]
  assert max(moved) > 0


def test_feedback_start_step_delays_teacher_updates():
  config = helpers.tiny_config('ffkd')
  config.ffkd.feedback_start_step = 5
  _, _, initial = helpers.build(config)
  final, _, _ = run_steps(config, 2, num_steps=2)
  for a, b in zip(
      jax.tree.leaves(initial.roles['teacher']), jax.tree.leaves(final.roles['teacher'])
  ):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_step_compiles_once():
  config = helpers.tiny_config('ffkd')
  _, _, train_step = run_steps(config, 2, num_steps=3)
  assert train_step.compiled_count() == 1


def test_presets_switch_the_spec_terms():
  config = helpers.tiny_config('ffkd')
  spec = {  # preset: (a_feat on, channel weights on, feedback on)
      'fkd': (False, False, False),
      'fkd_cka': (True, True, False),
      'fkd_fbkd': (True, False, True),
      'ffkd': (True, True, True),
  }
  for preset, (feat, weights, feedback) in spec.items():
    terms = ffkd_method.terms_for_preset(preset, config.ffkd)
    assert (terms.a_feat > 0) == feat, preset
    assert terms.use_channel_weights == weights, preset
    assert terms.feedback == feedback, preset
    # Everything a preset does not switch keeps the configured value.
    assert terms.a_ce == config.ffkd.a_ce and terms.a_kd == config.ffkd.a_kd
    assert terms.temperature == config.ffkd.temperature
  with pytest.raises(ValueError, match='ffkd_x'):
    ffkd_method.terms_for_preset('ffkd_x', config.ffkd)


@pytest.mark.parametrize(
    'preset,expect_feat,expect_teacher',
    [
        ('fkd', False, False),
        ('fkd_cka', True, False),
        ('fkd_fbkd', True, True),
        ('ffkd', True, True),
    ],
)
def test_presets_in_the_step(preset, expect_feat, expect_teacher):
  config = helpers.tiny_config(preset)
  _, metrics, _ = run_steps(config, 1, num_steps=1, batch_size=8)
  assert ('loss/student_feat' in metrics[0]) == expect_feat
  assert ('loss/teacher' in metrics[0]) == expect_teacher
  if preset == 'fkd_fbkd':  # w = 1: no spread in the channel weights
    assert all(v == 0 for k, v in metrics[0].items() if k.startswith('weights_std/'))
  if preset in ('ffkd', 'fkd_cka'):
    assert any(v > 0 for k, v in metrics[0].items() if k.startswith('weights_std/'))


def test_a_late_role_follows_the_global_schedule_and_is_not_updated_before():
  """Teacher from step k = 2: no update (and no backward pass) before k; from k on, its update
  is exactly schedule(s) times its update at unit rate from the same state and batch."""
  k, num_steps = 2, 5

  def config_with(schedule, learning_rate):
    config = helpers.tiny_config('ffkd')
    config.ffkd.feedback_start_step = k
    config.optimizer.momentum = 0.0
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = schedule
    config.optimizer.learning_rate = learning_rate
    config.optimizer.decay_epochs = (0.3,)  # x0.1 at step 3 (10 steps an epoch)
    return config

  method, programs, state = helpers.build(config_with('steps', 0.05))
  _, unit_programs, _ = helpers.build(config_with('constant', 1.0))
  schedule = programs['teacher'].schedule
  assert float(schedule(2)) != float(schedule(3))  # the decay falls after the start
  mesh = helpers.mesh_of(2)
  train_step = step_lib.make_train_step(method, programs, mesh)
  unit_step = step_lib.make_train_step(method, unit_programs, mesh)
  state = parallel.replicate(mesh, state)
  for s in range(num_steps):
    batch = parallel.global_batch(mesh, helpers.random_batch(s))
    before = parallel.fetch(state)
    unit_state, _ = unit_step(parallel.replicate(mesh, before), batch, s)
    state, metrics = train_step(state, batch, s)
    after, unit_after = parallel.fetch(state), parallel.fetch(unit_state)
    metrics = parallel.fetch(metrics)
    teacher = [
        (np.asarray(b), np.asarray(a), np.asarray(u))
        for b, a, u in zip(
            jax.tree.leaves(before.roles['teacher']),
            jax.tree.leaves(after.roles['teacher']),
            jax.tree.leaves(unit_after.roles['teacher']),
        )
    ]
    if s < k:
      assert train_step.updated_roles(s) == {'student'}
      assert metrics['lr/teacher'] == 0.0
      for b, a, _ in teacher:
        np.testing.assert_array_equal(a, b)
      continue
    assert train_step.updated_roles(s) == {'teacher', 'student'}
    rate = float(schedule(s))
    np.testing.assert_allclose(metrics['lr/teacher'], rate, rtol=1e-6)
    unit_rate = float(unit_programs['teacher'].schedule(s))  # the role's lr_scale at rate 1
    params = jax.tree.leaves(before.roles['teacher'].params)
    moved = 0
    for (b, a, u), _ in zip(teacher, params):
      if not np.issubdtype(b.dtype, np.floating) or np.array_equal(u, b):
        continue
      # float32 rounding of b + delta: a few ulps of the parameter
      ulps = 4 * np.finfo(np.float32).eps * np.abs(b).max()
      np.testing.assert_allclose(a - b, (u - b) * rate / unit_rate, rtol=2e-3, atol=ulps)
      moved += 1
    assert moved > 0
  # Before k the teacher costs no backward pass: that program does fewer FLOPs.
  batch = parallel.global_batch(mesh, helpers.random_batch(0))

  def flops(step):
    return train_step.jitted(step).lower(state, batch).compile().cost_analysis()['flops']

  assert flops(0) < 0.8 * flops(k)
