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
from ffkd_jax.methods.base import Method, RoleOutput, StepInputs
from ffkd_jax.parallel import DATA_AXIS
from ffkd_jax.states import RoleProgram, RoleState, TrainState, trainable_part


def _variables(params, stats, key):
  variables = {'params': params[key]}
  if stats.get(key):
    variables['batch_stats'] = stats[key]
  return variables


def _backbone_forward(program: RoleProgram, params, stats, images, train: bool):
  """(logits, features, new batch stats) of one role's backbone.

  train=True trains what the role trains: a frozen backbone still runs in inference mode and its
  outputs are stop-gradient, so no backward pass goes through it. train=False reads it in
  inference mode (evaluation, and a role not updated at this step: no gradient reaches it).
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
  return logits, features, new_stats


def _heads_forward(program: RoleProgram, params, stats, new_stats, features, train: bool):
  """The role's heads on `features` -> (head outputs, new batch stats)."""
  heads_vars = _variables(params, stats, 'heads')
  if not train:
    return program.heads.apply(heads_vars, features, train=False), new_stats
  heads_out, updated = program.heads.apply(
      heads_vars, features, train=True, mutable=['batch_stats']
  )
  if 'batch_stats' in updated:
    new_stats = dict(new_stats, heads=updated['batch_stats'])
  return heads_out, new_stats


def forward_roles(
    programs: Mapping[str, RoleProgram],
    params: Mapping[str, dict],
    stats: Mapping[str, dict],
    images,
    members,
    trained=frozenset(),
    with_heads=None,
):
  """The forward pass of the roles `members` -> ({role: RoleOutput}, {role: new batch stats}).

  `trained`: the roles run in training mode (the rest in inference mode); `with_heads`: the
  roles whose heads are computed (None: every member). A role's heads read the features of
  `RoleProgram.heads_source` (stop-gradient when that is another role), which must be a member.
  """
  with_heads = set(members) if with_heads is None else set(with_heads)
  backbones, new_stats = {}, {}
  for name in members:
    logits, features, new_stats[name] = _backbone_forward(
        programs[name], params[name], stats[name], images, train=name in trained
    )
    backbones[name] = (logits, features)
  outputs = {}
  for name in members:
    logits, features = backbones[name]
    heads_out = {}
    if programs[name].heads is not None and name in with_heads:
      source = programs[name].heads_source
      if source not in backbones:
        raise ValueError(
            f"the heads of role '{name}' read the features of '{source}', which this "
            f'phase does not run (its roles: {", ".join(members)}).'
        )
      inputs = backbones[source][1]
      if source != name:
        inputs = jax.lax.stop_gradient(inputs)
      heads_out, new_stats[name] = _heads_forward(
          programs[name], params[name], stats[name], new_stats[name], inputs, name in trained
      )
    outputs[name] = RoleOutput(logits, features, heads_out)
  return outputs, new_stats


def stream_batch(batch, stream: int):
  """The (images, labels) of train stream `stream` in a step's batch (see `batch_key`)."""
  return batch[batch_key('image', stream)], batch[batch_key('label', stream)]


def batch_key(name: str, stream: int) -> str:
  """The key of stream `stream`'s `name` ('image', 'label') in a step's batch dict: 'image'
  for stream 0, 'image:1' for stream 1, ..."""
  return name if stream == 0 else f'{name}:{stream}'


def _step_inputs(phase, batch, method_state) -> StepInputs:
  """What a stateful phase reads: the method state, and stream 0's example indices if any."""
  index = batch.get('index')
  if index is not None and phase.stream != 0:
    raise ValueError(
        f"phase '{phase.name}' reads stream {phase.stream}, but example indices "
        "(batch['index']) come with stream 0 only."
    )
  return StepInputs(method_state, index)


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
  Each updated role's learning rate is its schedule at the global step (less its
  `Role.schedule_start`).
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
  """The jitted step that updates the roles in `updated` and reads every other one frozen.

  The method's phases run in order; each updates the roles of its `trains` in `updated` (one
  backward pass with respect to their trainable parameters) and hands the new state to the next.
  """
  phases = method.phases()

  def per_device_step(state: TrainState, batch):
    num_devices = jax.lax.axis_size(DATA_AXIS)
    step = state.step
    roles = dict(state.roles)  # the state as the phases so far left it
    method_state = state.method_state
    losses, metrics, logits, learning_rates = {}, {}, {}, {}
    finite = jnp.array(True)
    for phase in phases:
      trained = frozenset(name for name in phase.trains if name in updated)
      if not trained:
        continue
      images, labels = stream_batch(batch, phase.stream)
      trainable = {name: trainable_part(programs[name], roles[name].params) for name in trained}
      with_heads = [n for n in phase.members if n in trained or phase.read_heads]

      inputs = _step_inputs(phase, batch, method_state) if phase.stateful else None

      def objective(trainable, phase=phase, trained=trained, images=images, labels=labels):
        params = {name: {**roles[name].params, **trainable.get(name, {})} for name in phase.members}
        stats = {name: roles[name].batch_stats for name in phase.members}
        outputs, new_stats = forward_roles(
            programs, params, stats, images, phase.members, trained, with_heads
        )
        if phase.stateful:
          phase_losses, phase_metrics, new_method_state = phase.loss(outputs, labels, step, inputs)
        else:
          phase_losses, phase_metrics = phase.loss(outputs, labels, step)
          new_method_state = None
        total = sum(phase_losses[name] for name in trained) / num_devices
        phase_logits = {name: out.logits for name, out in outputs.items()}
        return total, (phase_losses, phase_metrics, new_stats, phase_logits, new_method_state)

      grads, (phase_losses, phase_metrics, new_stats, phase_logits, new_method_state) = jax.grad(
          objective, has_aux=True
      )(trainable)
      if phase.stateful:
        method_state = jax.lax.stop_gradient(new_method_state)
        finite = jnp.logical_and(finite, _all_finite(method_state))
      for name in sorted(trained):
        program, role_state, part = programs[name], roles[name], trainable[name]
        direction, opt_state = program.optimizer.update(grads[name], role_state.opt_state, part)
        learning_rates[name] = jnp.asarray(program.schedule(step), jnp.float32)
        new_part = optax.apply_updates(part, optim.scaled_updates(direction, learning_rates[name]))
        roles[name] = RoleState({**role_state.params, **new_part}, new_stats[name], opt_state)
      # A non-finite loss, gradient or updated state anywhere (e.g. finite gradients times an
      # infinite learning rate) skips the whole step's update; every device agrees. (The losses
      # of the roles a phase updates: another role's loss is only logged.)
      trained_losses = {name: phase_losses[name] for name in trained}
      finite = jnp.logical_and(finite, _all_finite(trained_losses))
      finite = jnp.logical_and(finite, _all_finite(grads))
      finite = jnp.logical_and(finite, _all_finite({n: roles[n] for n in trained}))
      for name, loss in phase_losses.items():
        if name in trained or name not in losses:
          losses[name] = loss
      metrics.update(phase_metrics)
      for name, role_logits in phase_logits.items():
        if name in trained or name not in logits:
          logits[name] = (role_logits, labels)
    finite = jax.lax.pmin(finite.astype(jnp.int32), DATA_AXIS) > 0

    new_roles = {}
    for name in programs:
      if name not in updated:
        new_roles[name] = state.roles[name]
        continue
      new_roles[name] = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), roles[name], state.roles[name]
      )
    new_state = TrainState(
        step=step + 1,
        roles=new_roles,
        skipped_steps=state.skipped_steps + (1 - finite.astype(jnp.int32)),
        method_state=jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), method_state, state.method_state
        ),
    )

    metrics = dict(metrics)
    for name, loss in losses.items():
      metrics[f'loss/{name}'] = loss
      metrics[f'loss_finite/{name}'] = jnp.isfinite(loss).astype(jnp.float32)
    for name, (role_logits, role_labels) in logits.items():
      metrics[f'train/{name}_top1'] = jnp.mean(top_k_correct(role_logits, role_labels, 1))
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
      logits, _, _ = _backbone_forward(
          program, role_state.params, role_state.batch_stats, batch['image'], train=False
      )
      num_classes = logits.shape[-1]
      counts[f'{name}_top1'] = jnp.sum(top_k_correct(logits, batch['label'], 1) * mask)
      counts[f'{name}_top5'] = jnp.sum(
          top_k_correct(logits, batch['label'], min(5, num_classes)) * mask
      )
    counts['count'] = jnp.sum(mask)
    return jax.lax.psum(counts, DATA_AXIS)

  sharded = jax.shard_map(per_device_eval, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())
  return jax.jit(sharded)


def make_diagnostics_step(method: Method, programs: Mapping[str, RoleProgram], mesh):
  """(state, batch) -> the method's diagnostics, plus the teacher-layer x student-layer linear CKA
  matrix `cka_matrix` (rows: teacher stages, columns: student stages) where both roles exist."""

  def per_device(state: TrainState, batch):
    params = {name: role_state.params for name, role_state in state.roles.items()}
    stats = {name: role_state.batch_stats for name, role_state in state.roles.items()}
    outputs, _ = forward_roles(programs, params, stats, batch['image'], tuple(programs))
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
