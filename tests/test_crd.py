"""CRD (ffkd_jax/losses/crd.py, ffkd_jax/methods/crd.py) against a float64 NumPy transcription of
HobbitLong/RepDistiller's crd/memory.py (ContrastMemory.forward) and crd/criterion.py
(ContrastLoss), and its memory as method state through the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ffkd_jax import parallel
from ffkd_jax import step as step_lib
from ffkd_jax.losses import crd
from ffkd_jax.parallel import DATA_AXIS
from tests import helpers

EPS = 1e-7


def np_contrast_memory(memory_v1, memory_v2, v1, v2, y, idx, t, momentum, z_v1, z_v2):
  """ContrastMemory.forward with the indices given: (out_v1, out_v2, new memories, Z's)."""
  memory_v1, memory_v2 = memory_v1.astype(np.float64), memory_v2.astype(np.float64)
  n = memory_v1.shape[0]
  b, k1 = idx.shape
  out_v2 = np.zeros((b, k1))
  out_v1 = np.zeros((b, k1))
  for i in range(b):  # the bmm, one example at a time
    out_v2[i] = np.exp(memory_v1[idx[i]] @ v2[i] / t)
    out_v1[i] = np.exp(memory_v2[idx[i]] @ v1[i] / t)
  if z_v1 < 0:
    z_v1 = out_v1.mean() * n
  if z_v2 < 0:
    z_v2 = out_v2.mean() * n
  new_v1, new_v2 = memory_v1.copy(), memory_v2.copy()
  for i, row in enumerate(y):
    pos = memory_v1[row] * momentum + v1[i] * (1 - momentum)
    new_v1[row] = pos / np.sqrt((pos**2).sum())
    pos = memory_v2[row] * momentum + v2[i] * (1 - momentum)
    new_v2[row] = pos / np.sqrt((pos**2).sum())
  return out_v1 / z_v1, out_v2 / z_v2, new_v1, new_v2, z_v1, z_v2


def np_contrast_loss(x, n_data):
  bsz, m = x.shape[0], x.shape[1] - 1
  pn = 1.0 / n_data
  log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + EPS))
  log_d0 = np.log((m * pn) / (x[:, 1:] + m * pn + EPS))
  return -(log_d1.sum() + log_d0.reshape(-1).sum()) / bsz


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('impl', ['dense', 'gather', 'auto'])
def test_scores_loss_and_update_against_repdistiller(impl):
  rng = np.random.default_rng(0)
  n, d, b, k = 50, 8, 6, 12
  memory_v1, memory_v2 = _unit(rng, n, d), _unit(rng, n, d)
  v1, v2 = _unit(rng, b, d), _unit(rng, b, d)
  y = rng.permutation(n)[:b]
  idx = np.concatenate([y[:, None], rng.integers(0, n, (b, k))], axis=1)
  t, m = 0.07, 0.5
  ref = np_contrast_memory(memory_v1, memory_v2, v1, v2, y, idx, t, m, -1.0, -1.0)

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out_v1 = crd.contrast_scores(f32(memory_v2), f32(v1), jnp.asarray(idx), t, impl)
  out_v2 = crd.contrast_scores(f32(memory_v1), f32(v2), jnp.asarray(idx), t, impl)
  z_v1, z_v2 = crd.normalization_constant(out_v1, n), crd.normalization_constant(out_v2, n)
  np.testing.assert_allclose(z_v1, ref[4], rtol=1e-5)
  np.testing.assert_allclose(z_v2, ref[5], rtol=1e-5)
  np.testing.assert_allclose(out_v1 / z_v1, ref[0], rtol=1e-4)
  np.testing.assert_allclose(out_v2 / z_v2, ref[1], rtol=1e-4)
  loss = crd.contrast_loss(out_v1 / z_v1, n) + crd.contrast_loss(out_v2 / z_v2, n)
  np.testing.assert_allclose(
      loss, np_contrast_loss(ref[0], n) + np_contrast_loss(ref[1], n), rtol=1e-5
  )
  new_v1 = crd.momentum_update(f32(memory_v1), jnp.asarray(y), f32(v1), m)
  new_v2 = crd.momentum_update(f32(memory_v2), jnp.asarray(y), f32(v2), m)
  np.testing.assert_allclose(new_v1, ref[2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_v2, ref[3], rtol=1e-5, atol=1e-6)


def test_scores_reach_the_embeddings_only_and_the_loss_falls_as_the_positive_aligns():
  rng = np.random.default_rng(1)
  n, d = 40, 4
  memory = jnp.asarray(_unit(rng, n, d), jnp.float32)
  idx = jnp.asarray(np.concatenate([[[3]], rng.integers(0, n, (1, 9))], axis=1))
  v = jnp.asarray(_unit(rng, 1, d), jnp.float32)
  loss = lambda mem, v: crd.contrast_loss(crd.contrast_scores(mem, v, idx, 0.07), n)
  g_memory, g_v = jax.grad(loss, argnums=(0, 1))(memory, v)
  assert not np.any(g_memory) and np.any(g_v)  # the memory is read stop-gradient
  aligned = memory[3:4]  # the positive's own memory row as the embedding
  assert float(loss(memory, aligned)) < float(loss(memory, -aligned))


def test_class_table_and_negatives_come_uniformly_from_the_other_classes():
  labels = np.array([2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 2])
  table = crd.class_table(labels)
  np.testing.assert_array_equal(table['by_class'], np.argsort(labels, kind='stable'))
  np.testing.assert_array_equal(table['class_count'], [3, 3, 5])
  np.testing.assert_array_equal(table['class_start'], [0, 3, 6])
  rows = jnp.asarray(np.repeat([0, 1, 2], 4))
  draws = np.asarray(crd.sample_negatives(jax.random.key(0), rows, table, 6000))
  assert draws.shape == (12, 6000)
  for row, label in enumerate(np.asarray(rows)):
    others = np.flatnonzero(labels != label)
    assert set(draws[row]) == set(others)  # every other-class example, none of its own class
    counts = np.bincount(draws[row], minlength=len(labels))[others]
    expected = 6000 / len(others)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


def _config():
  config = helpers.tiny_config('crd')
  config.optimizer.weight_decay = 0.0
  config.crd.nce_k = 64
  return config


def _one_device_step(config):
  """(state before, state after, metrics, embeddings {role: (b, d)}, batch) of one step, on a
  batch whose labels are those of its indices (as the input pipeline gives them)."""
  method, programs, state = helpers.build(config)
  mesh = helpers.mesh_of(1)
  batch = helpers.random_batch(0, 16)
  batch['label'] = helpers.TRAIN_LABELS[batch['index']]

  @functools.partial(
      jax.shard_map, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(), check_vma=False
  )
  def embeddings(state, images):
    params = {n: s.params for n, s in state.roles.items()}
    stats = {n: s.batch_stats for n, s in state.roles.items()}
    outputs, _ = step_lib.forward_roles(
        programs, params, stats, images, tuple(programs), trained=frozenset(programs)
    )
    return {n: o.heads['embed'] for n, o in outputs.items()}

  before = jax.tree.map(np.asarray, state)
  embeds = jax.tree.map(np.asarray, jax.jit(embeddings)(state, batch['image']))
  train_step = step_lib.make_train_step(method, programs, mesh)
  after, metrics = train_step(parallel.replicate(mesh, state), parallel.global_batch(mesh, batch))
  return before, parallel.fetch(after), parallel.fetch(metrics), embeds, batch


def test_one_step_of_the_method_against_repdistiller():
  """The step's CRD losses, Z's and new memories are ContrastMemory + ContrastLoss on its
  embeddings, with the negatives drawn from (seed, step)."""
  config = _config()
  before, after, metrics, embeds, batch = _one_device_step(config)
  ms = before.method_state
  n = ms['memory_student'].shape[0]
  assert n == helpers.TRAIN_EXAMPLES
  method, _, _ = helpers.build(config)
  negatives = crd.sample_negatives(
      method.negatives_key(0),
      jnp.asarray(batch['label']),
      ms['classes'],
      config.crd.nce_k,
  )
  idx = np.concatenate([batch['index'][:, None], np.asarray(negatives)], axis=1)
  # Column 0 the example itself; every negative of another class than the example's.
  assert np.all(helpers.TRAIN_LABELS[idx[:, 1:]] != batch['label'][:, None])
  out_s, out_t, new_s, new_t, z_s, z_t = np_contrast_memory(
      ms['memory_student'],
      ms['memory_teacher'],
      embeds['student'].astype(np.float64),
      embeds['teacher'].astype(np.float64),
      batch['index'],
      idx,
      config.crd.nce_t,
      config.crd.nce_m,
      -1.0,
      -1.0,
  )
  np.testing.assert_allclose(metrics['loss/student_crd'], np_contrast_loss(out_s, n), rtol=1e-4)
  np.testing.assert_allclose(metrics['loss/teacher_crd'], np_contrast_loss(out_t, n), rtol=1e-4)
  np.testing.assert_allclose(metrics['crd/z_student'], z_s, rtol=1e-5)
  np.testing.assert_allclose(metrics['crd/z_teacher'], z_t, rtol=1e-5)
  np.testing.assert_allclose(after.method_state['memory_student'], new_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(after.method_state['memory_teacher'], new_t, rtol=1e-5, atol=1e-6)
  # Rows outside the batch are untouched, bit for bit; the class table is constant.
  outside = np.setdiff1d(np.arange(n), batch['index'])
  np.testing.assert_array_equal(
      after.method_state['memory_student'][outside], ms['memory_student'][outside]
  )
  jax.tree.map(np.testing.assert_array_equal, after.method_state['classes'], ms['classes'])
  # The total: CE + 0.8 CRD on the student, 0.8 CRD on the teacher's embedding head.
  np.testing.assert_allclose(
      metrics['loss/student'],
      metrics['loss/student_ce'] + 0.8 * metrics['loss/student_crd'],
      rtol=1e-5,
  )
  np.testing.assert_allclose(metrics['loss/teacher'], 0.8 * metrics['loss/teacher_crd'], rtol=1e-5)


def test_z_is_set_once_and_the_teacher_backbone_stays_frozen():
  from tests import test_methods  # pylint: disable=g-import-not-at-top

  _, states, history = test_methods.run(_config(), 2, num_steps=3)
  assert float(states[0].method_state['z_student']) == -1.0
  z = [float(s.method_state['z_student']) for s in states[1:]]
  assert z[0] > 0 and z[0] == z[1] == z[2]
  assert [h['crd/z_teacher'] for h in history][1:] == [history[0]['crd/z_teacher']] * 2
  teacher = [s.roles['teacher'] for s in states]
  jax.tree.map(
      np.testing.assert_array_equal, teacher[0].params['backbone'], teacher[-1].params['backbone']
  )
  assert not np.array_equal(
      teacher[0].params['heads']['linear']['kernel'],
      teacher[-1].params['heads']['linear']['kernel'],
  )


def test_a_non_finite_step_keeps_the_memory():
  config = _config()
  config.optimizer.learning_rate = float('inf')
  from tests import test_methods  # pylint: disable=g-import-not-at-top

  _, states, history = test_methods.run(config, 1, num_steps=1)
  assert history[0]['nonfinite'] == 1.0
  for key in ('memory_student', 'memory_teacher', 'z_student', 'z_teacher'):
    np.testing.assert_array_equal(states[1].method_state[key], states[0].method_state[key])


def test_config_errors_name_the_field():
  from ffkd_jax import methods  # pylint: disable=g-import-not-at-top

  for field, value, match in (
      ('nce_m', 1.0, r'config.crd.nce_m=1.0 .*\(0, 1\)'),
      ('nce_t', 0.0, r'config.crd.nce_t=0.0'),
      ('crd_weight', -1.0, r'config.crd.crd_weight=-1.0'),
      ('scores', 'fast', r"config.crd.scores='fast'.*'dense'"),
      ('nce_k', 0, r'config.crd.nce_k=0'),
  ):
    config = _config()
    config.crd[field] = value
    with pytest.raises(ValueError, match=match):
      methods.method_class(config).check_config(config)
  method, _, _ = helpers.build(_config())
  with pytest.raises(ValueError, match='at least 2 classes'):
    method.init_state(np.zeros(8, np.int32))
  with pytest.raises(ValueError, match="train split's labels"):
    method.init_state(None)


def test_the_gather_scores_give_the_dense_ones_through_the_step():
  dense, gathered = _config(), _config()
  dense.crd.scores, gathered.crd.scores = 'dense', 'gather'
  _, after_d, metrics_d, _, _ = _one_device_step(dense)
  _, after_g, metrics_g, _, _ = _one_device_step(gathered)
  for key in ('loss/student_crd', 'loss/teacher_crd', 'crd/z_student', 'loss/student'):
    np.testing.assert_allclose(metrics_g[key], metrics_d[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(after_g), jax.tree.leaves(after_d)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoints_hold_the_memory_and_stateless_ones_leave_the_field_out(tmp_path):
  """A CRD state round-trips with its memory; a CE state is saved without `method_state` (the
  layout of checkpoints written before the field existed) and restores with it empty."""
  from ffkd_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  for method, field_saved in (('crd', True), ('ce', False)):
    config = _config()
    config.method = method
    _, _, state = helpers.build(config)
    state = state.replace(step=jnp.int32(3))
    checkpoints = checkpoint_lib.Checkpoints(str(tmp_path / method), keep=1)
    checkpoints.save(state, {})
    checkpoints.wait()
    saved = checkpoint_lib.restore_state_tree(
        str(tmp_path / method / 'checkpoints' / '3' / 'state')
    )
    assert ('method_state' in saved) == field_saved
    restored, _ = checkpoints.restore_latest(state)
    checkpoints.close()
    jax.tree.map(np.testing.assert_array_equal, restored.method_state, state.method_state)
    if method == 'crd':
      bad = state.replace(
          method_state=dict(state.method_state, z_student=jnp.float32(float('nan')))
      )
      with pytest.raises(FloatingPointError, match='method state is not finite'):
        checkpoint_lib.Checkpoints(str(tmp_path / 'bad'), keep=1).save(bad, {})
