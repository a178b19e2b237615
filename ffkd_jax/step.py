"""The jitted, data-parallel train, eval and diagnostics steps.

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
from ffkd_jax.losses.classification import top_k_correct
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
  outputs are stop-gradient, so no backward pass goes through it.
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


def make_train_step(method: Method, programs: Mapping[str, RoleProgram], mesh):
  """(state, batch) -> (state, metrics); jitted once, state donated."""

  def per_device_step(state: TrainState, batch):
    num_devices = jax.lax.axis_size(DATA_AXIS)
    step = state.step
    trainable = {
        name: trainable_part(p, state.roles[name].params)
        for name, p in programs.items()
        if p.optimizer is not None
    }

    def objective(trainable):
      outputs, new_stats = {}, {}
      for name, program in programs.items():
        role_state = state.roles[name]
        params = {**role_state.params, **trainable.get(name, {})}
        outputs[name], new_stats[name] = forward(
            program, params, role_state.batch_stats, batch['image'], train=True
        )
      losses, metrics = method.loss(outputs, batch['label'], step)
      total = sum(losses.values()) / num_devices
      logits = {name: out.logits for name, out in outputs.items()}
      return total, (losses, metrics, new_stats, logits)

    grads, (losses, metrics, new_stats, logits) = jax.grad(objective, has_aux=True)(trainable)

    updated_roles = {}
    for name, program in programs.items():
      if program.optimizer is None:
        continue
      role_state, part = state.roles[name], trainable[name]
      updates, opt_state = program.optimizer.update(grads[name], role_state.opt_state, part)
      updated_roles[name] = RoleState(
          {**role_state.params, **optax.apply_updates(part, updates)}, new_stats[name], opt_state
      )

    # A non-finite loss, gradient or updated state anywhere (e.g. finite gradients times an
    # infinite learning rate) skips the whole update; every device agrees.
    finite = jnp.logical_and(_all_finite(losses), _all_finite(grads))
    finite = jnp.logical_and(finite, _all_finite(updated_roles))
    finite = jax.lax.pmin(finite.astype(jnp.int32), DATA_AXIS) > 0

    new_roles = {}
    for name, program in programs.items():
      role_state = state.roles[name]
      if program.optimizer is None:
        new_roles[name] = role_state
        continue
      updated = updated_roles[name]
      keep = jnp.logical_and(finite, method.role_active(name, step))
      new_roles[name] = jax.tree.map(
          lambda new, old: jnp.where(keep, new, old), updated, role_state
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
      if program.schedule is not None:
        metrics[f'lr/{name}'] = jnp.asarray(program.schedule(step), jnp.float32)
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


def stage_names(features: Mapping[str, object]) -> list[str]:
  """The post-activation stage outputs of a model, in order (stage1, stage2, ...)."""
  names = [k for k in features if k.startswith('stage') and not k.endswith('_preact')]
  return sorted(names, key=lambda k: int(k[len('stage') :]))


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
              for name in stage_names(outputs[role].features)
          ]
          for role in ('teacher', 'student')
      }  # each (n_global, h, w, c)
      result['cka_matrix'] = cka.layer_cka_matrix(stages['teacher'], stages['student'])
    # Every device computed the same numbers from the gathered batch; pmean makes that explicit.
    return jax.lax.pmean(result, DATA_AXIS)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())
  return jax.jit(sharded)
