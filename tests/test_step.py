"""The data-parallel step: devices, ordered phases, freezing, compilation, FFKD presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ffkd_jax import parallel
from ffkd_jax import step as step_lib
from ffkd_jax.methods import ffkd as ffkd_method
from ffkd_jax.methods.base import Phase
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


def _plain_sgd(config):
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  return config


@pytest.mark.parametrize('feedback_batch', ['independent', 'same'])
def test_feedback_phase_reads_the_student_after_its_update(feedback_batch):
  """One FFKD step = the student's update on stream 0, then the teacher's on the feedback batch
  reading the *updated* student: recomputed here phase by phase outside the step, the teacher
  matches; with the student from before its update it does not."""
  config = _plain_sgd(helpers.tiny_config('ffkd'))
  config.ffkd.feedback_batch = feedback_batch
  method, programs, state = helpers.build(config)
  state = parallel.fetch(state)  # host copies: the step donates what it is given
  mesh = helpers.mesh_of(1)
  host_batch = helpers.random_batch(0)
  batch = parallel.global_batch(mesh, host_batch)
  train_step = step_lib.make_train_step(method, programs, mesh)
  after, _ = train_step(parallel.replicate(mesh, state), batch, 0)
  after = parallel.fetch(after)
  stream = 1 if feedback_batch == 'independent' else 0
  images, labels = step_lib.stream_batch(host_batch, stream)
  lr = float(programs['teacher'].schedule(0))

  def teacher_after(student_state):
    """The teacher after one plain-SGD feedback update that reads `student_state`."""

    def teacher_loss(trainable, images, labels):
      params = {
          'teacher': {**state.roles['teacher'].params, **trainable},
          'student': student_state.params,
      }
      stats = {'teacher': state.roles['teacher'].batch_stats, 'student': student_state.batch_stats}
      outputs, _ = step_lib.forward_roles(
          programs, params, stats, images, ('teacher', 'student'), {'teacher'}, ('teacher',)
      )
      return method.teacher_loss(outputs, labels, jnp.int32(0))[0]['teacher']

    trainable = {k: state.roles['teacher'].params[k] for k in ('backbone', 'heads')}
    grads = jax.jit(
        jax.shard_map(
            jax.grad(teacher_loss), mesh=mesh, in_specs=(P(), P('data'), P('data')), out_specs=P()
        )
    )(trainable, images, labels)
    return jax.tree.map(lambda p, g: np.asarray(p) - lr * np.asarray(g), trainable, grads)

  expected = teacher_after(after.roles['student'])
  stale = teacher_after(state.roles['student'])
  got = {k: after.roles['teacher'].params[k] for k in ('backbone', 'heads')}
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
  gap = max(np.abs(s - g).max() for s, g in zip(jax.tree.leaves(stale), jax.tree.leaves(got)))
  assert gap > 1e-5  # the stale student would have given another teacher


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


def test_presets_are_the_ablation_rows():
  """fkd: CE + KD; fkd_cka: + CKA-weighted channel loss; fkd_fbkd: unweighted channel loss and
  feedback over all stages; ffkd: both CKA switches (docs/FFKD.md)."""
  spec = {  # preset: (channel loss, forward CKA, feedback, feedback CKA)
      'fkd': (False, False, False, False),
      'fkd_cka': (True, True, False, False),
      'fkd_fbkd': (True, False, True, False),
      'ffkd': (True, True, True, True),
  }
  for preset, switches in spec.items():
    got = ffkd_method.switches_for(preset)
    assert (got.channel_loss, got.forward_cka, got.feedback, got.feedback_cka) == switches
    method, programs, _ = helpers.build(helpers.tiny_config(preset))
    assert [p.name for p in method.phases()] == (
        ['forward', 'feedback'] if switches[2] else ['forward']
    )
    assert (programs['student'].heads is not None) == switches[0]
    assert (programs['teacher'].heads is not None) == switches[2]
    assert (programs['teacher'].optimizer is not None) == switches[2]
  with pytest.raises(ValueError, match='ffkd_x'):
    ffkd_method.switches_for('ffkd_x')


@pytest.mark.parametrize('preset', ['fkd', 'fkd_cka', 'fkd_fbkd', 'ffkd'])
def test_presets_in_the_step(preset):
  config = helpers.tiny_config(preset)
  switches = ffkd_method.switches_for(preset)
  _, metrics, _ = run_steps(config, 1, num_steps=1, batch_size=8)
  m = metrics[0]
  assert ('loss/student_channel' in m) == switches.channel_loss
  assert ('loss/teacher' in m) == switches.feedback
  selected = [v for k, v in m.items() if k.startswith('fdbk_selected/')]
  if preset == 'fkd_fbkd':
    assert selected == [1.0] * 3
  if preset == 'ffkd':  # the stages with CKA_k <= the mean: at least one, not all (distinct CKA)
    scores = [m[k] for k in sorted(m) if k.startswith('cka_fdbk/')]
    assert selected == [float(c <= np.mean(scores)) for c in scores]
    assert 1 <= sum(selected) < 3


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
  # The same student in both: the teacher's phase reads the student its phase left.
  unit_programs = dict(unit_programs, student=programs['student'])
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


class _Counting:
  """A stand-in method of two stateful phases on KD's roles: each adds 1 to a counter in the
  method state (the second one's loss optionally NaN), and one phase on stream 1."""

  def __init__(self, kd, nan_second=False, second_stream=0):
    self._kd, self._nan, self._stream = kd, nan_second, second_stream

  def phases(self):
    def phase_loss(bump_nan):
      def loss(outputs, labels, step, inputs):
        losses, metrics = self._kd.loss(outputs, labels, step)
        if bump_nan:
          losses = {k: v * jnp.nan for k, v in losses.items()}
        count = inputs.method_state['count']
        metrics = dict(metrics, seen=count)
        return losses, metrics, {'count': count + 1.0}

      return loss

    return (
        Phase('first', ('teacher', 'student'), phase_loss(False), stateful=True),
        Phase(
            'second',
            ('teacher', 'student'),
            phase_loss(self._nan),
            stream=self._stream,
            stateful=True,
        ),
    )


def _counting_step(nan_second=False, second_stream=0):
  method, programs, state = helpers.build(helpers.tiny_config('kd'))
  mesh = helpers.mesh_of(2)
  counting = _Counting(method, nan_second, second_stream)
  state = state.replace(method_state={'count': jnp.float32(0.0)})
  train_step = step_lib.make_train_step(counting, programs, mesh)
  batch = parallel.global_batch(mesh, helpers.random_batch(0, 8))
  return train_step(parallel.replicate(mesh, state), batch, 0)


def test_stateful_phases_chain_the_method_state_and_a_non_finite_step_keeps_it():
  """The second phase reads the state the first left (seen == 1); both bumps are kept; a NaN in
  the second phase keeps the state of before the step, as it keeps the roles."""
  state, metrics = _counting_step()
  assert float(parallel.fetch(state.method_state)['count']) == 2.0
  assert float(metrics['seen']) == 1.0 and float(metrics['nonfinite']) == 0.0
  state, metrics = _counting_step(nan_second=True)
  assert float(metrics['nonfinite']) == 1.0
  assert float(parallel.fetch(state.method_state)['count']) == 0.0


def test_example_indices_come_with_stream_0_only():
  with pytest.raises(ValueError, match=r"phase 'second' reads stream 1.*stream 0 only"):
    _counting_step(second_stream=1)


@pytest.mark.parametrize('devices', [1, 2])
def test_gather_concatenates_the_devices_rows_and_is_no_collective_on_one(devices):
  from ffkd_jax.methods import base  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(jax.devices()[:devices])
  x = jnp.arange(4 * devices * 3, dtype=jnp.float32).reshape(4 * devices, 3)
  fn = jax.jit(
      jax.shard_map(
          lambda rows: base.gather(rows) * 1.0,
          mesh=mesh,
          in_specs=P('data'),
          out_specs=P('data'),
      )
  )
  out = fn(x)  # every device holds the whole batch: (devices * 4 * devices, 3) in all
  np.testing.assert_array_equal(np.asarray(out), np.tile(np.asarray(x), (devices, 1)))
  hlo = fn.lower(x).as_text()
  assert ('all_gather' in hlo or 'all-gather' in hlo) == (devices > 1)
