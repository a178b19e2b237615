"""The jitted, data-parallel train, eval and diagnostics steps.

The train step compiles one program per set of roles updated at a step (one in all for a method
without role windows); the eval and diagnostics steps one each.

Each is per-device SPMD code under `jax.shard_map` over the `data` mesh axis (what `jax.pmap`
meant), jitted once. Batch norm statistics, CKA and every other batch statistic are taken over the
global batch; gradients of the replicated parameters are summed over devices by shard_map (see
DEVELOPERS.md), so the per-device objective is divided by the device count.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from ffkd_jax import cka
from ffkd_jax import optim
from ffkd_jax.losses.classification import top_k_correct
from ffkd_jax.methods import pairs
from ffkd_jax.methods.base import Method, RoleOutput
from ffkd_jax.parallel import DATA_AXIS
from ffkd_jax.states import RoleProgram, RoleState, TrainState, trainable_part


def _variables(params, stats, key):
  variables = {'params': params[key]}
  if stats.get(key):
    variables['batch_stats'] = stats[key]
  return variables


def forward(program: RoleProgram, params, stats, images, train: bool):
  """One role's forward pass -> (RoleOutput, new batch stats).

  train=True trains what the role trains: a frozen backbone still runs in inference mode and its
  outputs are stop-gradient, so no backward pass goes through it. train=False reads the whole
  role in inference mode (evaluation, and a role not updated at this step; the train step then
  takes no gradient with respect to it).
  """
  new_stats = dict(stats)
  backbone_vars = _variables(params, stats, 'backbone')
  if train and program.role.train_backbone:
    (logits, features), updated = program.backbone.apply(
        backbone_vars, images, train=True, mutable=['batch_stats']
    )
    new_stats['backbone'] = updated['batch_stats']
  else:
    logits, features = program.backbone.apply(backbone_vars, images, train=False)
    if train:
      logits, features = jax.lax.stop_gradient((logits, features))
  heads_out = {}
  if program.heads is not None:
    heads_vars = _variables(params, stats, 'heads')
    if train:
      heads_out, updated = program.heads.apply(
          heads_vars, features, train=True, mutable=['batch_stats']
      )
      if 'batch_stats' in updated:
        new_stats['heads'] = updated['batch_stats']
    else:
      heads_out = program.heads.apply(heads_vars, features, train=False)
  return RoleOutput(logits, features, heads_out), new_stats


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class TrainStep:
  """(state, batch, step) -> (state, metrics): the data-parallel train step.

  One jitted program per set of roles updated at a step (state donated): every role whose
  `Role.start_step`/`stop_step` window holds `step`. A role outside its window is read like a
  frozen network (inference mode, stop-gradient): no backward pass goes through it and its state
  is untouched. A method without role windows compiles one program. `step` is the host-side
  global step (the train loop's counter); without it, the state's step is read from the device.
  Each updated role's learning rate is its schedule at the global step.
  """

  def __init__(self, method: Method, programs: Mapping[str, RoleProgram], mesh):
    self._method, self._programs, self._mesh = method, programs, mesh
    self._compiled = {}  # frozenset of updated roles -> jitted step

  def updated_roles(self, step: int) -> frozenset[str]:
    """The roles with an optimizer whose window holds `step`."""
    return frozenset(
        name
        for name, program in self._programs.items()
        if program.optimizer is not None and program.role.active(step)
    )

  def compiled_count(self) -> int:
    """Programs compiled so far, over every set of updated roles (each compiles once)."""
    return sum(fn._cache_size() for fn in self._compiled.values())  # pylint: disable=protected-access

  def jitted(self, step: int):
    """The jitted (state, batch) -> (state, metrics) program that step `step` runs."""
    updated = self.updated_roles(step)
    if updated not in self._compiled:
      self._compiled[updated] = _jitted_train_step(
          self._method, self._programs, self._mesh, updated
      )
    return self._compiled[updated]

  def __call__(self, state: TrainState, batch, step: int | None = None):
    if step is None:
      step = int(jax.device_get(state.step))
    return self.jitted(step)(state, batch)


def make_train_step(method: Method, programs: Mapping[str, RoleProgram], mesh) -> TrainStep:
  return TrainStep(method, programs, mesh)


def _jitted_train_step(method, programs, mesh, updated: frozenset[str]):
  """The jitted step that updates the roles in `updated` and reads every other one frozen."""

  def per_device_step(state: TrainState, batch):
    num_devices = jax.lax.axis_size(DATA_AXIS)
    step = state.step
    trainable = {name: trainable_part(programs[name], state.roles[name].params) for name in updated}

    def objective(trainable):
      outputs, new_stats = {}, {}
      for name, program in programs.items():
        role_state = state.roles[name]
        params = {**role_state.params, **trainable.get(name, {})}
        outputs[name], new_stats[name] = forward(
            program, params, role_state.batch_stats, batch['image'], train=name in updated
        )
      losses, metrics = method.loss(outputs, batch['label'], step)
      total = sum(loss for name, loss in losses.items() if name in updated) / num_devices
      logits = {name: out.logits for name, out in outputs.items()}
      return total, (losses, metrics, new_stats, logits)

    grads, (losses, metrics, new_stats, logits) = jax.grad(objective, has_aux=True)(trainable)

    updated_roles, learning_rates = {}, {}
    for name in sorted(updated):
      program, role_state, part = programs[name], state.roles[name], trainable[name]
      direction, opt_state = program.optimizer.update(grads[name], role_state.opt_state, part)
      learning_rates[name] = jnp.asarray(program.schedule(step), jnp.float32)
      new_part = optax.apply_updates(part, optim.scaled_updates(direction, learning_rates[name]))
      updated_roles[name] = RoleState({**role_state.params, **new_part}, new_stats[name], opt_state)

    # A non-finite loss, gradient or updated state anywhere (e.g. finite gradients times an
    # infinite learning rate) skips the whole update; every device agrees.
    # (The losses of the roles updated at this step: another role's loss is only logged.)
    trained_losses = {name: loss for name, loss in losses.items() if name in updated}
    finite = jnp.logical_and(_all_finite(trained_losses), _all_finite(grads))
    finite = jnp.logical_and(finite, _all_finite(updated_roles))
    finite = jax.lax.pmin(finite.astype(jnp.int32), DATA_AXIS) > 0

    new_roles = {}
    for name in programs:
      if name not in updated:
        new_roles[name] = state.roles[name]
        continue
      new_roles[name] = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), updated_roles[name], state.roles[name]
      )
    new_state = TrainState(
        step=step + 1,
        roles=new_roles,
        skipped_steps=state.skipped_steps + (1 - finite.astype(jnp.int32)),
    )

    metrics = dict(metrics)
    for name, loss in losses.items():
      metrics[f'loss/{name}'] = loss
      metrics[f'loss_finite/{name}'] = jnp.isfinite(loss).astype(jnp.float32)
    for name, role_logits in logits.items():
      metrics[f'train/{name}_top1'] = jnp.mean(top_k_correct(role_logits, batch['label'], 1))
    for name, program in programs.items():
      if program.schedule is not None:  # the rate applied; 0 where the role was not updated
        metrics[f'lr/{name}'] = learning_rates.get(name, jnp.float32(0.0))
    metrics = jax.lax.pmean(metrics, DATA_AXIS)
    metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  sharded = jax.shard_map(
      per_device_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P())
  )
  return jax.jit(sharded, donate_argnums=(0,))


def make_eval_step(programs: Mapping[str, RoleProgram], mesh):
  """(state, batch) -> {role: (top1 count, top5 count)} summed over the global batch's real rows."""

  def per_device_eval(state: TrainState, batch):
    counts = {}
    mask = batch['mask']
    for name, program in programs.items():
      role_state = state.roles[name]
      output, _ = forward(
          program, role_state.params, role_state.batch_stats, batch['image'], train=False
      )
      num_classes = output.logits.shape[-1]
      counts[f'{name}_top1'] = jnp.sum(top_k_correct(output.logits, batch['label'], 1) * mask)
      counts[f'{name}_top5'] = jnp.sum(
          top_k_correct(output.logits, batch['label'], min(5, num_classes)) * mask
      )
    counts['count'] = jnp.sum(mask)
    return jax.lax.psum(counts, DATA_AXIS)

  sharded = jax.shard_map(per_device_eval, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())
  return jax.jit(sharded)


def make_diagnostics_step(method: Method, programs: Mapping[str, RoleProgram], mesh):
  """(state, batch) -> the method's diagnostics, plus the teacher-layer x student-layer linear CKA
  matrix `cka_matrix` (rows: teacher stages, columns: student stages) where both roles exist."""

  def per_device(state: TrainState, batch):
    outputs = {}
    for name, program in programs.items():
      role_state = state.roles[name]
      outputs[name], _ = forward(
          program, role_state.params, role_state.batch_stats, batch['image'], train=False
      )
    result = dict(method.diagnostics(outputs))
    if 'teacher' in outputs and 'student' in outputs:
      stages = {
          role: [
              jax.lax.all_gather(outputs[role].features[name], DATA_AXIS, tiled=True)
              for name in pairs.stage_names(outputs[role].features)
          ]
          for role in ('teacher', 'student')
      }  # each (n_global, h, w, c)
      result['cka_matrix'] = cka.layer_cka_matrix(stages['teacher'], stages['student'])
    # Every device computed the same numbers from the gathered batch; pmean makes that explicit.
    return jax.lax.pmean(result, DATA_AXIS)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())
  return jax.jit(sharded)
