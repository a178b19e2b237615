"""Training and evaluation of any method: `train_and_evaluate(config, workdir)`.

Sections in order: set-up (with the teacher pre-training chain, ffkd_jax/chain.py), mesh,
input, the method resolved and its networks and optimizers, restore, the jitted step and the
evaluator (ffkd_jax/evaluation.py), the loop (with evaluation, checkpoints and preemption), the
end. The CLI (`ffkd_jax.main`) and the
notebooks call this same function.

Preemption: on SIGTERM or SIGINT the step under way finishes, is checkpointed, the metrics are
flushed, and the run returns {'preempted_at': step} after a warning naming the step (the CLI then
exits with status 0); the same command resumes from that checkpoint, and from whatever it reached
after a SIGKILL (the steps logged since the last checkpoint are logged again, with equal values).
A chain stopped while its teacher pre-trains stops there too.
"""

import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ffkd_jax import chain
from ffkd_jax import checkpoint as checkpoint_lib
from ffkd_jax import config_checks
from ffkd_jax import data
from ffkd_jax import evaluation
from ffkd_jax import methods
from ffkd_jax import metrics as metrics_lib
from ffkd_jax import optim
from ffkd_jax import parallel
from ffkd_jax import states as states_lib
from ffkd_jax import step as step_lib
from ffkd_jax.models import conv


class Preempted(Exception):
  """Raised inside the loop when SIGTERM or SIGINT asked the run to stop."""


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop reads after each step."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook kernels): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def agreed(self, step: int, every: int) -> str | None:
    """The signal to stop on at `step`, the same on every process.

    One process stops at once. Several agree at every `every`-th step (one small all-gather),
    so that all of them save the same step together.
    """
    if jax.process_count() == 1:
      return self.received
    if step % every:
      return None
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return (self.received or 'a signal on another process') if np.any(flags) else None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _dtype(config):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.dtype]


def _load_teachers(config, method, programs, state):
  """Loads every pre-trained role's backbone from config.teacher.checkpoint; its heads, if
  any, are then what `method.pretrained_heads` makes of them (their fresh ones by default)."""
  roles = dict(state.roles)
  for role in method.roles():
    if not role.pretrained:
      continue
    current = roles[role.name]
    params, stats, _ = checkpoint_lib.load_pretrained_role(
        config.teacher.checkpoint,
        role.model,
        programs[role.name].backbone.num_classes,
        current.params['backbone'],
        current.batch_stats['backbone'],
        role=config.teacher.get('role', ''),
    )
    new_params = dict(current.params, backbone=params)
    new_stats = dict(current.batch_stats, backbone=stats)
    if programs[role.name].heads is not None:
      heads = method.pretrained_heads(
          role.name,
          {'params': current.params['heads'], 'batch_stats': current.batch_stats.get('heads', {})},
          {'params': params, 'batch_stats': stats},
      )
      new_params['heads'], new_stats['heads'] = heads['params'], heads['batch_stats']
    roles[role.name] = states_lib.RoleState(
        new_params, new_stats, states_lib.init_opt_state(programs[role.name], new_params)
    )
  return state.replace(roles=roles)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.method` and evaluates it; returns the final evaluation's metrics."""
  # --- Set-up -----------------------------------------------------------------------------
  with config_checks.config_errors():
    conv.configure(config.conv_impl)  # before JAX starts its backends, where it still can
    config_checks.validate(config, workdir)
    chain.check_teacher_source(config)
  try:  # a method that needs a teacher and has none trains one first (ffkd_jax/chain.py)
    config = chain.with_pretrained_teacher(config, workdir, train_and_evaluate)
  except chain.TeacherPreempted as teacher:  # stopped while the teacher trained: stop too
    return {'preempted_at': 0, 'teacher_preempted_at': teacher.args[0]}
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh()
  logging.info(
      'Devices: %d (%s), processes: %d; convolutions: %s.',
      jax.device_count(),
      jax.devices()[0].device_kind,
      jax.process_count(),
      conv.describe(),
  )

  # Set-up errors (a bad field, dataset, layer pair or teacher checkpoint) are ConfigErrors.
  with config_checks.config_errors():
    # --- Input ------------------------------------------------------------------------------
    source = data.open_source(config.dataset)
    info = source.info
    local_batch = parallel.local_batch_size(config.batch_size)
    steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
    schedule_steps = (  # the configured schedule's length
        config.num_train_steps
        if config.num_train_steps > 0
        else int(config.num_epochs * steps_per_epoch)
    )
    # A method may run steps before that schedule starts (IE-KD's auto-encoder).
    total_steps = schedule_steps + methods.method_class(config).steps_before_schedule(config)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    logging.info(
        'Dataset %s: %d classes, %d train / %d val / %d test; %d steps (%d per epoch).',
        info.name,
        info.num_classes,
        info.num_train,
        info.num_val,
        info.num_test,
        total_steps,
        steps_per_epoch,
    )

    # --- Networks and optimizers: the method resolved before any state exists ---------------
    def make_optimizer(lr_scale):
      schedule = optim.learning_rate_schedule(
          config.optimizer, steps_per_epoch, schedule_steps, scale=lr_scale
      )
      return optim.make_optimizer(config.optimizer), schedule

    method, programs = states_lib.resolve(
        config, info.num_classes, info.image_size, make_optimizer, dtype=_dtype(config)
    )
    labels = None
    if method.example_index:
      data.check_example_index(source)
      labels = data.train_labels(source)
    state = states_lib.init_state(programs, info.image_size, config.seed, method, labels)
    for name, role_state in state.roles.items():
      logging.info(
          'Role %s: %s, %.3fM parameters%s.',
          name,
          programs[name].role.model,
          states_lib.count_params(role_state.params['backbone']) / 1e6,
          '' if programs[name].optimizer else ' (frozen)',
      )

    # --- Restore ----------------------------------------------------------------------------
    checkpoints = checkpoint_lib.Checkpoints(workdir, config.keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    best_top1 = -1.0
    if restored is not None:
      state, meta = restored
      best_top1 = meta.get('best_top1', -1.0)
      logging.info('Resuming from step %d.', int(state.step))
    else:
      state = _load_teachers(config, method, programs, state)
  meta_base = {
      'method': config.method,
      'num_classes': info.num_classes,
      'image_size': info.image_size,
      'roles': {name: p.role.model for name, p in programs.items()},
  }
  state = parallel.replicate(mesh, state)
  start_step = int(jax.device_get(state.step))

  # --- The jitted steps and the evaluator -------------------------------------------------
  train_step = step_lib.make_train_step(method, programs, mesh)
  writer = metrics_lib.MetricWriter(workdir)
  with config_checks.config_errors():  # e.g. a val split too small for the diagnostics
    evaluator = evaluation.Evaluator(
        source=source,
        method=method,
        programs=programs,
        mesh=mesh,
        eval_batch_size=config.eval_batch_size,
        diagnostics_examples=config.diagnostics_examples,
        workdir=workdir,
        writer=writer,
    )

  def save(state, best=False, extra=None):
    meta = dict(meta_base, best_top1=best_top1, **(extra or {}))
    checkpoints.save(state, meta, best=best)

  # --- The loop ---------------------------------------------------------------------------
  streams = [  # one train stream per stream the method's phases read
      data.train_iterator(
          source,
          local_batch_size=local_batch,
          seed=config.seed,
          start_step=start_step,
          stream=k,
          with_index=method.example_index and k == 0,
      )
      for k in range(method.num_streams())
  ]
  progress = metrics_lib.Progress(total_steps, config.batch_size, start_step)
  last_record: dict[str, Any] = {}
  step = start_step
  pending_metrics = []
  with _StopSignal() as stop:
    try:
      while step < total_steps:
        batch = parallel.global_batch(mesh, _next_batch(streams))
        state, step_metrics = train_step(state, batch, step)
        step += 1
        pending_metrics.append(step_metrics)
        stop_now = stop.agreed(step, config.log_every_steps)
        if step % config.log_every_steps == 0 or step == total_steps or stop_now:
          host = parallel.fetch(pending_metrics)
          pending_metrics = []
          _check_finite(config, host, step)
          # (Keys can change within a window, e.g. when a phase starts: each over its steps.)
          keys = dict.fromkeys(k for m in host for k in m)
          averaged = {k: float(np.mean([m[k] for m in host if k in m])) for k in keys}
          averaged['skipped_steps'] = int(jax.device_get(state.skipped_steps))
          averaged.update(progress.report(step, averaged))
          writer.write(step, averaged)
        if step % eval_every == 0 or step == total_steps:
          last_record = evaluator.evaluate(state, step, {'epoch': step / steps_per_epoch})
          if last_record['eval/top1'] > best_top1:
            best_top1 = last_record['eval/top1']
            save(state, best=True, extra={'eval': _scalars(last_record)})
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
          save(state)
        if stop_now:
          raise Preempted(stop_now)
    except Preempted as signal_name:
      save(state)
      checkpoints.wait()
      writer.flush()
      logging.warning(
          'Received %s: saved step %d to %s; the same command resumes.',
          signal_name,
          step,
          workdir,
      )
      writer.close()
      checkpoints.close()
      return {'preempted_at': step}
    except Exception:
      checkpoints.wait()  # a save under way completes before the error ends the run
      raise
  checkpoints.wait()
  summary = {'step': step, 'best/eval_top1': best_top1}
  summary.update(_scalars(last_record))
  writer.write(step, {'final/' + k: v for k, v in summary.items() if isinstance(v, (int, float))})
  writer.close()
  checkpoints.close()
  return summary


def _next_batch(streams) -> dict[str, np.ndarray]:
  """One step's host batch: stream 0's 'image' and 'label' (and 'index' where the method asks
  for it), stream k's as 'image:k', 'label:k'."""
  batch = {}
  for k, stream in enumerate(streams):
    for name, value in next(stream).items():
      batch[step_lib.batch_key(name, k)] = value
  return batch


def _scalars(record):
  return {k: v for k, v in record.items() if isinstance(v, (int, float))}


def _check_finite(config, host_metrics, step):
  """Under nonfinite_policy='stop', stops with the step and the loss that went non-finite."""
  for offset, metrics in enumerate(host_metrics):
    if metrics['nonfinite'] > 0 and config.nonfinite_policy == 'stop':
      at = step - len(host_metrics) + offset + 1
      bad = [
          k.split('/', 1)[1] for k, v in metrics.items() if k.startswith('loss_finite/') and v < 1.0
      ]
      terms = ', '.join(
          k
          for k, v in metrics.items()
          if k.startswith('loss/') and not np.isfinite(v) and k.split('/', 1)[1] not in bad
      )
      if bad:
        what = f'the loss of {", ".join(bad)} is not finite' + (f' ({terms})' if terms else '')
      else:
        what = 'the losses are finite, but a gradient or the updated parameters are not'
      raise FloatingPointError(
          f'non-finite value at step {at}: {what} (config.nonfinite_policy=stop; '
          "'skip' skips such updates and counts them). The update was not applied."
      )
