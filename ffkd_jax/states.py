"""The networks of a run and their train states: one RoleState a role, kept as separate pytrees.

A role's parameters are `{'backbone': ..., 'heads': ...}` (heads only where the method adds
trainable extras). Only the trainable part has an optimizer and optimizer state: a frozen teacher
has neither.
"""

import dataclasses
import functools
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ffkd_jax import methods
from ffkd_jax import models
from ffkd_jax.methods.base import Method, Role
from ffkd_jax.parallel import DATA_AXIS


@flax.struct.dataclass
class RoleState:
  params: dict  # {'backbone': ..., 'heads': ...}
  batch_stats: dict  # same keys as params, where the module has batch norm
  opt_state: Any  # optimizer state of the trainable part; () when frozen


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied (skipped non-finite steps included)
  roles: dict[str, RoleState]
  skipped_steps: jax.Array  # int32 scalar: updates skipped for non-finite values
  # The method's own state (`Method.init_state`: CRD's memory); {} for most methods.
  method_state: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RoleProgram:
  """The static part of a role: its modules and optimizer (not part of any pytree)."""

  role: Role
  backbone: nn.Module
  heads: nn.Module | None
  optimizer: optax.GradientTransformation | None  # the update direction (ffkd_jax.optim)
  schedule: optax.Schedule | None
  head_input: str = ''  # the role whose features feed the heads ('' = this role)

  @property
  def heads_source(self) -> str:
    return self.head_input or self.role.name

  @property
  def trainable_keys(self) -> tuple[str, ...]:
    keys = ('backbone',) if self.role.train_backbone else ()
    return keys + (('heads',) if self.heads is not None else ())


def trainable_part(program: RoleProgram, params: Mapping[str, Any]) -> dict:
  return {k: params[k] for k in program.trainable_keys}


def _split_variables(variables) -> tuple[dict, dict]:
  variables = flax.core.unfreeze(variables)
  return variables.get('params', {}), variables.get('batch_stats', {})


def feature_shapes_of(backbones: Mapping[str, nn.Module], image_size: int) -> dict:
  """role -> feature name -> ShapeDtypeStruct, for a batch of 2 images (no computation)."""
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  shapes = {}
  for name, backbone in backbones.items():
    variables = jax.eval_shape(functools.partial(backbone.init, train=False), jax.random.key(0), x)
    _, features = jax.eval_shape(functools.partial(backbone.apply, train=False), variables, x)
    shapes[name] = features
  return shapes


def resolve(
    config, num_classes: int, image_size: int, make_optimizer, dtype=jnp.float32
) -> tuple[Method, dict[str, RoleProgram]]:
  """The resolved method and every role's program, before any state exists.

  The method's roles give the backbones; their feature shapes and `num_classes` resolve the
  method (`methods.create_method`: layer pairs, head shapes, features checked); the method gives
  the heads. make_optimizer(lr_scale) -> (optax direction, schedule).
  """
  roles = methods.method_roles(config)
  backbones = {
      r.name: models.create_model(r.model, num_classes, axis_name=DATA_AXIS, dtype=dtype)
      for r in roles
  }
  method = methods.create_method(config, feature_shapes_of(backbones, image_size), num_classes)
  programs = {}
  for role in method.roles():
    heads = method.heads(role.name)
    trainable = role.train_backbone or heads is not None
    optimizer, schedule = make_optimizer(role.lr_scale) if trainable else (None, None)
    if schedule is not None and role.schedule_start:
      schedule = _started_at(schedule, role.schedule_start)
    programs[role.name] = RoleProgram(
        role, backbones[role.name], heads, optimizer, schedule, method.head_input(role.name)
    )
  return method, programs


def _started_at(schedule: optax.Schedule, start: int) -> optax.Schedule:
  """The schedule as a role whose schedule starts at global step `start` sees it."""
  return lambda step: schedule(jnp.maximum(step - start, 0))


def init_state(
    programs: Mapping[str, RoleProgram],
    image_size: int,
    seed: int,
    method: Method | None = None,
    train_labels=None,
) -> TrainState:
  """Fresh parameters for every role (pre-trained ones are loaded over them afterwards), and
  `method.init_state(train_labels)` where a method is given (else no method state)."""
  x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  params, stats, features, head_keys = {}, {}, {}, {}
  for index, (name, program) in enumerate(programs.items()):
    key_backbone, head_keys[name] = jax.random.split(
        jax.random.fold_in(jax.random.key(seed), index)
    )
    params[name], stats[name] = {}, {}
    params[name]['backbone'], stats[name]['backbone'] = _split_variables(
        program.backbone.init(key_backbone, x, train=False)
    )
    _, features[name] = program.backbone.apply(
        {'params': params[name]['backbone'], 'batch_stats': stats[name]['backbone']},
        x,
        train=False,
    )
  roles = {}
  for name, program in programs.items():
    if program.heads is not None:  # on the features of the role that feeds them
      params[name]['heads'], stats[name]['heads'] = _split_variables(
          program.heads.init(head_keys[name], features[program.heads_source], train=False)
      )
    roles[name] = RoleState(params[name], stats[name], init_opt_state(program, params[name]))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      roles=roles,
      skipped_steps=jnp.zeros((), jnp.int32),
      method_state={} if method is None else method.init_state(train_labels),
  )


def init_opt_state(program: RoleProgram, params: Mapping[str, Any]) -> Any:
  if program.optimizer is None:
    return ()
  return program.optimizer.init(trainable_part(program, params))


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
