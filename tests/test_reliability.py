"""Reliability: checkpoints that always restore, exact resumption, preemption, non-finite values,
determinism.

Checkpoint integrity is tested on a small hand-made TrainState (no training). Resumption and
preemption run the real CLI in subprocesses (tests/run_fixture.py) and compare the final
checkpoints bit for bit with an uninterrupted run; the non-finite policies and determinism run
`train_and_evaluate` in this process (4 emulated devices, tests/conftest.py).
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffkd_jax import checkpoint as checkpoint_lib
from tests import run_fixture

# ----------------------------------------------------------------------------------------------
# Checkpoint integrity (no training).


def save_steps(workdir, steps, keep=3) -> dict:
  """Saves small_state(step, offset=step) for each step and waits; returns what was saved."""
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), keep)
  saved = {}
  for step in steps:
    saved[step] = run_fixture.small_state(step, offset=float(step))
    checkpoints.save(saved[step], {'method': 'ce'})
  checkpoints.wait()
  checkpoints.close()
  return saved


def restore(workdir, keep=3):
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), keep)
  try:
    return checkpoints.restore_latest(run_fixture.small_state(0))
  finally:
    checkpoints.close()


def step_dir(workdir, step):
  return os.path.join(workdir, 'checkpoints', str(step))


def test_old_checkpoints_are_deleted_only_after_the_newer_one_is_whole(tmp_path):
  workdir = str(tmp_path)
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep=2)
  for step in (1, 2):
    checkpoints.save(run_fixture.small_state(step), {})
  checkpoints.wait()
  snapshots, done = [], threading.Event()

  def watch():
    while not done.is_set():
      snapshots.append(set(os.listdir(os.path.join(workdir, 'checkpoints'))))

  watcher = threading.Thread(target=watch)
  watcher.start()
  checkpoints.save(run_fixture.small_state(3), {})  # keep=2: 1 goes, once 3 is complete
  checkpoints.wait()
  done.set()
  watcher.join()
  checkpoints.close()
  assert run_fixture.checkpoint_steps(workdir) == [2, 3]
  assert snapshots and all('1' in names or '3' in names for names in snapshots), snapshots


CRASH_DURING_SAVE = """
import os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from ffkd_jax import checkpoint as checkpoint_lib
from tests.run_fixture import small_state
checkpoints = checkpoint_lib.Checkpoints({workdir!r}, keep=2)
for step in (1, 2):
  checkpoints.save(small_state(step, offset=step), {{}})
checkpoints.wait()
checkpoints.save(small_state(3, offset=3), {{}})  # asynchronous: still being written ...
os._exit(0)  # ... when the process dies
"""


def test_a_crash_during_an_asynchronous_save_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  script = CRASH_DURING_SAVE.format(
      repo=run_fixture.REPO, workdir=workdir, tests=os.path.dirname(os.path.abspath(__file__))
  )
  subprocess.run(
      [sys.executable, '-c', script],
      check=True,
      env=run_fixture.cli_env(1),
      capture_output=True,
      timeout=300,
  )
  steps = run_fixture.checkpoint_steps(workdir)
  assert 2 in steps and (1 in steps or 3 in steps), os.listdir(os.path.join(workdir, 'checkpoints'))
  state, _ = restore(workdir)
  newest = steps[-1]
  run_fixture.assert_trees_equal(
      jax.device_get(state), run_fixture.small_state(newest, offset=newest)
  )
  # The step that was cut off is saved again over whatever it left.
  save_steps(workdir, [3])
  state, _ = restore(workdir)
  assert int(state.step) == 3


def test_leftover_temporary_directories_are_ignored_and_replaced(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [3, 4])
  # What a process killed during a save leaves: orbax's temporary directories (both spellings).
  leftover = os.path.join(workdir, 'checkpoints', '5.orbax-checkpoint-tmp')
  os.makedirs(os.path.join(leftover, 'state'))
  with open(os.path.join(leftover, 'state', 'manifest.ocdbt'), 'wb') as f:
    f.write(b'half written')
  os.makedirs(os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1700000000'))
  state, _ = restore(workdir)
  assert int(state.step) == 4
  saved = save_steps(workdir, [5])
  state, _ = restore(workdir)
  run_fixture.assert_trees_equal(jax.device_get(state), saved[5])


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path):
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def _rewrite_meta(path, change):
  with open(path, encoding='utf-8') as f:
    meta = json.load(f)
  change(meta)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(meta, f)


CORRUPTIONS = {
    # Lost or cut-off files, as a full disk or a killed copy leaves them.
    'state directory deleted': lambda d: shutil.rmtree(os.path.join(d, 'state')),
    'largest array file truncated': lambda d: _truncate(_largest_file(os.path.join(d, 'state'))),
    'array index deleted': lambda d: os.remove(os.path.join(d, 'state', 'manifest.ocdbt')),
    'meta truncated': lambda d: _truncate(os.path.join(d, 'meta', 'metadata')),
    # Damaged bytes: orbax may read these without complaint; the saved digest catches them.
    'byte flipped in the largest array file': lambda d: _flip_byte(
        _largest_file(os.path.join(d, 'state'))
    ),
    'arrays differ from the saved digest': lambda d: _rewrite_meta(
        os.path.join(d, 'meta', 'metadata'), lambda meta: meta.update(state_digest='0' * 64)
    ),
}


# orbax's reader threads report the damaged files once more at exit ("Event loop is closed").
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, corruption):
  workdir = str(tmp_path)
  saved = save_steps(workdir, [1, 2, 3])
  CORRUPTIONS[corruption](step_dir(workdir, 3))
  with caplog.at_level(logging.WARNING):
    state, meta = restore(workdir)
  assert int(state.step) == 2 and meta['step'] == 2
  run_fixture.assert_trees_equal(jax.device_get(state), saved[2])
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any('step 3' in w and 'falling back to step 2' in w for w in warnings), warnings

  # Saving step 3 again replaces the damaged one.
  checkpoints = checkpoint_lib.Checkpoints(workdir, 3)
  assert checkpoints.restore_latest(run_fixture.small_state(0))[1]['step'] == 2
  checkpoints.save(saved[3], {})
  checkpoints.wait()
  checkpoints.close()
  state, _ = restore(workdir)
  run_fixture.assert_trees_equal(jax.device_get(state), saved[3])


def test_when_no_checkpoint_restores_the_run_stops_instead_of_starting_over(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2])
  for step in (1, 2):
    _truncate(_largest_file(os.path.join(step_dir(workdir, step), 'state')))
  with pytest.raises(RuntimeError, match=r'none of the checkpoints.*step 2.*step 1'):
    restore(workdir)


def test_checkpoints_of_another_shape_do_not_restore(tmp_path):
  """E.g. config.model changed but the workdir is the same: stop, and say so."""
  workdir = str(tmp_path)
  save_steps(workdir, [1])
  other = run_fixture.small_state(0)
  other = other.replace(
      roles={
          'model': other.roles['model'].replace(
              params={'backbone': {'conv1': {'kernel': jnp.zeros((3, 3, 3, 32))}}}
          )
      }
  )
  checkpoints = checkpoint_lib.Checkpoints(workdir, 3)
  with pytest.raises(RuntimeError, match=r'(?s)step 1.*config changed.*--workdir'):
    checkpoints.restore_latest(other)
  checkpoints.close()


@pytest.mark.parametrize('part', ['params', 'batch_stats'])
def test_non_finite_values_are_never_checkpointed(tmp_path, part):
  state = run_fixture.small_state(7)
  role = state.roles['model']
  bad = jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan), getattr(role, part))
  state = state.replace(roles={'model': role.replace(**{part: bad})})
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path), 3)
  with pytest.raises(FloatingPointError, match=f"step 7: {part} of role 'model' are not finite"):
    checkpoints.save(state, {})
  checkpoints.wait()
  checkpoints.close()
  assert run_fixture.checkpoint_steps(str(tmp_path)) == []


# ----------------------------------------------------------------------------------------------
# Whole runs through the CLI: resumption and preemption.

# The FFKD chain in one command: CE pre-training of the teacher (8 steps, into WORKDIR/teacher),
# then FFKD with feedback (9 steps). Checkpoints every 3 steps (2 kept), evaluation every 4.
CHAIN = dict(method='ffkd', teacher__pretrain_steps=8, num_train_steps=9)
# The chain's teacher phase as a command of its own: the same CE training.
TEACHER = dict(method='ce', num_train_steps=8)


@pytest.fixture(scope='session')
def shared(tmp_path_factory):
  return run_fixture.shared_dir(tmp_path_factory)


@pytest.fixture(scope='session')
def data_path(shared):
  return run_fixture.once(shared, 'data', run_fixture.write_dataset)


def reference(shared, data_path, name, changes, num_devices) -> str:
  """The workdir of an uninterrupted run, made once a session."""
  return run_fixture.once(
      shared,
      name,
      lambda path: run_fixture.run_to_end(
          path, run_fixture.tiny_overrides(data_path, **changes), num_devices
      ),
  )


def record_key(record):
  return record['step'], tuple(sorted(run_fixture.stable_values(record)))


def assert_same_records(records, reference_records, what):
  """Every train and eval record (re-logged ones too) equals the reference's of that step.

  `final/*` records are left out: a command started again after the end writes another.
  """
  expected = {
      record_key(r): run_fixture.stable_values(r)
      for r in reference_records
      if not any(k.startswith('final/') for k in r)
  }
  records = [r for r in records if not any(k.startswith('final/') for k in r)]
  for record in records:
    assert record_key(record) in expected, f'{what}: unexpected record {record}'
    assert (
        run_fixture.stable_values(record) == expected[record_key(record)]
    ), f'{what}: step {record["step"]} differs'
  assert {record_key(r) for r in records} == set(expected), f'{what}: records missing'


def new_train_steps(workdir, already_logged):
  return [
      r['step']
      for r in run_fixture.read_records(workdir)[already_logged:]
      if run_fixture.is_train_record(r)
  ]


@pytest.mark.slow
def test_chain_resumes_bit_identically_after_sigint_and_sigkill(tmp_path, shared, data_path):
  """SIGINT while the teacher pre-trains (CE), SIGKILL while FFKD trains, the same command again:
  teacher and student end bit-identical to an uninterrupted chain."""
  workdir = str(tmp_path / 'chain')
  teacher_dir = os.path.join(workdir, 'teacher')
  overrides = run_fixture.tiny_overrides(data_path, **CHAIN)

  # SIGINT during the teacher's CE training: it saves, and the whole command stops there.
  run = run_fixture.Run(workdir, overrides)
  run.signal_at_step(2, signal.SIGINT, metrics_dir=teacher_dir)
  assert run.wait() == 0, run.output[-3000:]
  saved = run_fixture.checkpoint_steps(teacher_dir)[-1]
  assert 2 <= saved < 8
  assert f'Received SIGINT: saved step {saved} to {teacher_dir}' in run.output
  assert max(run_fixture.train_steps(teacher_dir)) == saved  # metrics flushed up to it
  assert run_fixture.checkpoint_steps(workdir) == []  # FFKD did not start

  # SIGKILL during FFKD, at whatever step it has reached once a first checkpoint is whole.
  run = run_fixture.Run(workdir, overrides)
  run.signal_at_step(4, signal.SIGKILL, checkpointed=True)
  assert run.wait() == -signal.SIGKILL
  assert f'Resuming from step {saved}.' in run.output  # the teacher's CE run
  killed = run_fixture.checkpoint_steps(workdir)
  assert killed and killed[-1] < 9, killed
  logged = len(run_fixture.read_records(workdir))

  # The same command again: FFKD resumes from its last checkpoint and logs on from there (the
  # steps between that checkpoint and the kill are logged a second time, with equal values).
  run = run_fixture.Run(workdir, overrides)
  assert run.wait() == 0, run.output[-3000:]
  assert f'Resuming from step {killed[-1]}.' in run.output
  assert new_train_steps(workdir, logged) == list(range(killed[-1] + 1, 10))

  uninterrupted = reference(shared, data_path, 'chain', CHAIN, num_devices=1)
  for sub, step in (('teacher', 8), ('', 9)):
    run_fixture.assert_trees_equal(
        run_fixture.restore_state(os.path.join(workdir, sub), step),
        run_fixture.restore_state(os.path.join(uninterrupted, sub), step),
        f'{sub or "ffkd"}:',
    )
    assert_same_records(
        run_fixture.read_records(os.path.join(workdir, sub)),
        run_fixture.read_records(os.path.join(uninterrupted, sub)),
        sub or 'ffkd',
    )
  # FFKD's feedback trained the teacher on: its parameters moved from the pre-trained ones.
  final = run_fixture.restore_state(workdir, 9)['roles']['teacher']['params']['backbone']
  pretrained = run_fixture.restore_state(teacher_dir, 8)['roles']['model']['params']['backbone']
  assert not np.array_equal(final['conv1']['kernel'], pretrained['conv1']['kernel'])


# CRD from a CE teacher pre-trained in the same command (4 steps), then 9 steps of CRD (64
# negatives): its memory of every train example is method state.
CRD_CHAIN = dict(method='crd', teacher__pretrain_steps=4, num_train_steps=9, crd__nce_k=64)


@pytest.mark.slow
def test_crd_memory_resumes_bit_identically_after_sigkill(tmp_path, shared, data_path):
  """SIGKILL while CRD trains, the same command again: the memories, Z and every role end
  bit-identical to an uninterrupted run, and the memory did change from its initial state."""
  workdir = str(tmp_path / 'crd')
  overrides = run_fixture.tiny_overrides(data_path, **CRD_CHAIN)
  run = run_fixture.Run(workdir, overrides)
  run.signal_at_step(4, signal.SIGKILL, checkpointed=True)
  assert run.wait() == -signal.SIGKILL
  killed = run_fixture.checkpoint_steps(workdir)
  assert killed and killed[-1] < 9, killed
  run = run_fixture.Run(workdir, overrides)
  assert run.wait() == 0, run.output[-3000:]
  assert f'Resuming from step {killed[-1]}.' in run.output

  uninterrupted = reference(shared, data_path, 'crd', CRD_CHAIN, num_devices=1)
  resumed, straight = run_fixture.restore_state(workdir, 9), run_fixture.restore_state(
      uninterrupted, 9
  )
  run_fixture.assert_trees_equal(resumed, straight, 'crd:')
  assert_same_records(
      run_fixture.read_records(workdir), run_fixture.read_records(uninterrupted), 'crd'
  )
  memory = resumed['method_state']['memory_student']
  earlier = run_fixture.checkpoint_steps(workdir)[0]  # the older one kept, step 6
  first = run_fixture.restore_state(workdir, earlier)['method_state']['memory_student']
  assert memory.shape[1] == 128 and not np.array_equal(memory, first)
  assert float(resumed['method_state']['z_teacher']) > 0


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_bit_identically(tmp_path, shared, data_path):
  """CE on 4 devices: SIGTERM finishes the step, saves it, flushes metrics, exits 0 with a
  message; the same command resumes at that step and ends as an uninterrupted run."""
  workdir = str(tmp_path / 'ce')
  overrides = run_fixture.tiny_overrides(data_path, **TEACHER)
  run = run_fixture.Run(workdir, overrides, num_devices=4)
  run.signal_at_step(2, signal.SIGTERM)
  assert run.wait() == 0, run.output[-3000:]
  saved = run_fixture.checkpoint_steps(workdir)[-1]
  assert 2 <= saved < 8
  assert (
      f'Received SIGTERM: saved step {saved} to {workdir}; the same command resumes.' in run.output
  )
  assert max(run_fixture.train_steps(workdir)) == saved
  logged = len(run_fixture.read_records(workdir))

  run = run_fixture.Run(workdir, overrides, num_devices=4)
  assert run.wait() == 0, run.output[-3000:]
  assert f'Resuming from step {saved}.' in run.output
  assert new_train_steps(workdir, logged) == list(range(saved + 1, 9))

  uninterrupted = reference(shared, data_path, 'ce_4_devices', TEACHER, num_devices=4)
  run_fixture.assert_trees_equal(
      run_fixture.restore_state(workdir, 8), run_fixture.restore_state(uninterrupted, 8)
  )
  assert_same_records(
      run_fixture.read_records(workdir), run_fixture.read_records(uninterrupted), 'ce'
  )


# ----------------------------------------------------------------------------------------------
# Determinism.

# 1 and 4 devices sum the gradients and the batch-norm statistics in another order: float32
# rounding. After these 8 SGD steps (learning rate 0.1, batch 8) the state differs by at most
# 1e-6 absolute (3e-5 relative where |x| > 0.01) and the losses by 1e-7 relative: the tolerances
# leave a factor of about 10.
DEVICES_RTOL, DEVICES_ATOL = 1e-4, 1e-5
LOSS_RTOL = 1e-6


@pytest.mark.slow
def test_one_and_four_devices_agree_within_tolerance(shared, data_path):
  one = os.path.join(reference(shared, data_path, 'chain', CHAIN, num_devices=1), 'teacher')
  four = reference(shared, data_path, 'ce_4_devices', TEACHER, num_devices=4)
  state_one, state_four = run_fixture.restore_state(one, 8), run_fixture.restore_state(four, 8)
  flat_four = dict(jax.tree_util.tree_leaves_with_path(state_four))
  for path, leaf in jax.tree_util.tree_leaves_with_path(state_one):
    np.testing.assert_allclose(
        flat_four[path],
        leaf,
        rtol=DEVICES_RTOL,
        atol=DEVICES_ATOL,
        err_msg=jax.tree_util.keystr(path),
    )
  losses = {}
  for name, workdir in (('one', one), ('four', four)):
    losses[name] = [
        r['loss/ce'] for r in run_fixture.read_records(workdir) if run_fixture.is_train_record(r)
    ]
  assert len(losses['one']) == 8
  np.testing.assert_allclose(losses['four'], losses['one'], rtol=LOSS_RTOL)


@pytest.mark.slow
def test_the_same_seed_gives_identical_metrics_and_parameters(tmp_path, shared, data_path):
  """The 4-device CE run again, in this process (4 emulated devices): equal to the last bit."""
  from ffkd_jax import train  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / 'again')
  train.train_and_evaluate(
      run_fixture.make_config(run_fixture.tiny_overrides(data_path, **TEACHER)), workdir
  )
  first = reference(shared, data_path, 'ce_4_devices', TEACHER, num_devices=4)
  assert_same_records(run_fixture.read_records(workdir), run_fixture.read_records(first), 'ce')
  run_fixture.assert_trees_equal(
      run_fixture.restore_state(workdir, 8), run_fixture.restore_state(first, 8)
  )


# ----------------------------------------------------------------------------------------------
# Non-finite values (in this process, with the loss, the input or the schedule patched).

NONFINITE_RUN = dict(
    num_train_steps=6,
    checkpoint_every_steps=1,
    keep_checkpoints=10,
    eval_every_steps=100,
    optimizer__schedule='constant',
)


def _roles(workdir, step):
  return run_fixture.restore_state(workdir, step)['roles']


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


def test_skip_policy_skips_and_counts_non_finite_updates(tmp_path, data_path, monkeypatch):
  """A NaN pixel in the batch of step 2, and from step 5 on an infinite learning rate (finite
  loss and gradients, non-finite update): those updates are skipped and counted,
  the run ends, and every checkpoint is finite."""
  from ffkd_jax import data, optim, train  # pylint: disable=g-import-not-at-top

  def train_iterator(*args, **kwargs):
    for index, batch in enumerate(clean_iterator(*args, **kwargs)):
      if index == 1:  # the batch of step 2
        batch = dict(batch, image=batch['image'].copy())
        batch['image'][0, 0, 0, 0] = np.nan
      yield batch

  def learning_rate_schedule(*args, **kwargs):
    schedule = clean_schedule(*args, **kwargs)
    # The rate is the schedule at the global step: infinite from step 4 (the 5th update) on, so
    # every later update is skipped too.
    return lambda step: jnp.where(step >= 4, jnp.inf, schedule(step))

  clean_iterator, clean_schedule = data.train_iterator, optim.learning_rate_schedule
  monkeypatch.setattr(data, 'train_iterator', train_iterator)
  monkeypatch.setattr(optim, 'learning_rate_schedule', learning_rate_schedule)
  workdir = str(tmp_path / 'skip')
  config = run_fixture.make_config(run_fixture.tiny_overrides(data_path, **NONFINITE_RUN))
  assert config.nonfinite_policy == 'skip'  # the default
  summary = train.train_and_evaluate(config, workdir)
  assert summary['step'] == 6

  records = [r for r in run_fixture.read_records(workdir) if run_fixture.is_train_record(r)]
  assert [r['nonfinite'] for r in records] == [0, 1, 0, 0, 1, 1]
  assert [r['skipped_steps'] for r in records] == [0, 1, 1, 1, 2, 3]
  assert np.isnan(records[1]['loss/ce']) and np.isfinite(records[4]['loss/ce'])
  assert run_fixture.checkpoint_steps(workdir) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):
    assert _all_finite(_roles(workdir, step)), step
  # A skipped step leaves parameters, batch statistics and optimizer state as they were.
  run_fixture.assert_trees_equal(_roles(workdir, 2), _roles(workdir, 1), 'step 2')
  for step in (5, 6):
    run_fixture.assert_trees_equal(_roles(workdir, step), _roles(workdir, 4), f'step {step}')
  assert not np.array_equal(*(jax.tree.leaves(_roles(workdir, s))[0] for s in (2, 3)))


def test_stop_policy_names_the_step_and_the_loss(tmp_path, data_path, monkeypatch):
  """The loss goes NaN at step 3; the check runs at the logging step (4): the error still names
  step 3 and the loss, and the checkpoints written are finite."""
  from ffkd_jax import train  # pylint: disable=g-import-not-at-top
  from ffkd_jax.methods.ce import CrossEntropy  # pylint: disable=g-import-not-at-top

  clean_loss = CrossEntropy.loss

  def loss(self, outputs, labels, step):
    losses, metrics = clean_loss(self, outputs, labels, step)
    factor = jnp.where(step == 2, jnp.nan, 1.0)  # state.step 2: the update logged as step 3
    return (
        {k: v * factor for k, v in losses.items()},
        {k: v * factor if k == 'loss/ce' else v for k, v in metrics.items()},
    )

  monkeypatch.setattr(CrossEntropy, 'loss', loss)
  workdir = str(tmp_path / 'stop')
  config = run_fixture.make_config(
      run_fixture.tiny_overrides(
          data_path, nonfinite_policy='stop', log_every_steps=2, **NONFINITE_RUN
      )
  )
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert 'non-finite value at step 3: the loss of model is not finite (loss/ce)' in message
  assert 'config.nonfinite_policy=stop' in message
  assert run_fixture.checkpoint_steps(workdir) == [1, 2, 3]
  for step in (1, 2, 3):
    assert _all_finite(_roles(workdir, step))
  run_fixture.assert_trees_equal(_roles(workdir, 3), _roles(workdir, 2), 'step 3')


def test_torn_metrics_line_is_skipped_and_appending_continues(tmp_path):
  """A crash mid-write leaves a partial last line; readers skip it and writers start afresh."""
  from ffkd_jax import metrics as metrics_lib

  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo', encoding='utf-8')
  writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(3, {'loss': 0.25})
  writer.close()
  events = metrics_lib.read_metrics(str(tmp_path))
  assert [e['step'] for e in events] == [1, 3]
  assert events[1]['loss'] == 0.25
