"""The distiller interface: what a method needs from the trainer, and nothing more.

A method names its roles (the networks it trains or reads: a teacher and a student, or peers),
the trainable extras ("heads": connectors, regressors, auto-encoders) each role carries, and its
phases: the ordered updates of one train step. Most methods have one phase (the default): the
trainer runs one forward pass of every role, sums the losses of the roles it updates at that
step, takes one backward pass with respect to their trainable parameters, and applies each
role's optimizer; stop-gradients inside the loss make that sum give each role exactly the
gradient of its own loss. A method with several phases (FFKD: the student's update, then the
teacher's on another batch, reading the just-updated student) gets them run in order inside the
same jitted step, each phase seeing the state the phases before it left.

A method is resolved completely before any state exists, in three steps that
`ffkd_jax.methods.create_method` and `ffkd_jax.states.resolve` run:
  1. `check_config(config)`: the method validates its own config block (classmethod);
  2. `make_roles(config)`: its roles (classmethod), from which the trainer builds the models and
     reads their feature shapes;
  3. `__init__(config, feature_shapes)`: everything else (layer pairs, head shapes) from those
     shapes. The object is frozen afterwards: any attribute assignment raises.

`loss` runs inside the data-parallel step (shard_map over the `data` axis) on this device's
rows: cross-entropy-like terms are local batch means; statistics over the batch are taken on the
global batch with `gather` (see DEVELOPERS.md).
"""

import abc
import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffkd_jax.losses.classification import softened_kl, standardize_logits
from ffkd_jax.parallel import DATA_AXIS

Array = jax.Array
Metrics = dict[str, Array]
FeatureShapes = Mapping[str, Mapping[str, jax.ShapeDtypeStruct]]  # role -> feature -> shape


@dataclasses.dataclass(frozen=True)
class Role:
  """One network of a method.

  name: key of the role ('teacher', 'student', 'peer0', ...).
  model: registry name of its backbone.
  train_backbone: whether the backbone is updated (else: inference-mode batch norm, no optimizer
    state and no backward pass through it). Heads, if any, are always trained while the role is
    active.
  pretrained: whether the backbone is loaded from `config.teacher.checkpoint`.
  lr_scale: its learning rate over the base schedule's.
  start_step, stop_step: the role is updated at the steps s with start_step <= s < stop_step
    (stop_step None: to the end). Outside that window it is read like a frozen network (inference
    mode, stop-gradient, no backward pass) and its state is untouched; inside it, its learning
    rate at step s is its schedule at step s - schedule_start.
  schedule_start: 0 (the default): the role follows the run's schedule at the global step (FFKD's
    teacher); > 0: its schedule starts then, e.g. IE-KD's student, whose whole schedule follows
    the auto-encoder's steps (`Method.steps_before_schedule`).
  """

  name: str
  model: str
  train_backbone: bool = True
  pretrained: bool = False
  lr_scale: float = 1.0
  start_step: int = 0
  stop_step: int | None = None
  schedule_start: int = 0

  def active(self, step: int) -> bool:
    """Whether the role is updated at (host-side) step `step`."""
    return step >= self.start_step and (self.stop_step is None or step < self.stop_step)

  @property
  def windowed(self) -> bool:
    """Whether the role is updated at some steps only."""
    return self.start_step > 0 or self.stop_step is not None


@dataclasses.dataclass(frozen=True)
class RoleOutput:
  """What one forward pass of a role gives the loss (this device's rows)."""

  logits: Array  # (n, classes)
  features: Mapping[str, Array]  # backbone features by name
  heads: Mapping[str, Any]  # outputs of the role's heads, {} without heads


# (outputs, labels, step) -> (per-role losses, metrics); a stateful phase's loss also takes
# StepInputs and returns the new method state third (`Phase.stateful`).
LossFn = Callable[..., tuple]


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What a stateful phase's loss reads beyond outputs, labels and step (`Phase.stateful`).

  method_state: the method's state (`Method.init_state`) as the phases before left it,
    replicated: the same on every device.
  index: (n,) int32 this device's rows' positions in the train split (stream 0), where the
    method asks for them (`Method.example_index`); None otherwise.
  """

  method_state: Any
  index: Array | None


@dataclasses.dataclass(frozen=True)
class Phase:
  """One ordered update inside the train step.

  name: for metrics and errors.
  trains: the roles this phase updates (those active at the step, see `Role.start_step`); a
    role listed here but not updated at a step (a frozen teacher, a role outside its window) is
    read in inference mode, as in `reads`.
  loss: (outputs, labels, step) -> (per-role losses, metrics), over the roles of this phase.
  reads: further roles the loss reads, in inference mode and stop-gradient.
  stream: which train stream's batch the phase sees (0: the main one; 1: a second,
    independent and equally deterministic stream, see ffkd_jax.data.train_iterator).
  read_heads: whether the heads of the roles read (not updated) are computed too.
  stateful: whether the phase reads and updates the method's state: its loss is then called as
    loss(outputs, labels, step, StepInputs) and returns (per-role losses, metrics, new method
    state); the new state must be the same on every device (computed from gathered values), is
    stop-gradient, and is kept only where the whole step's update is (non-finite steps keep
    the old one).
  A phase none of whose `trains` roles is updated at a step is skipped at that step.
  """

  name: str
  trains: tuple[str, ...]
  loss: LossFn
  reads: tuple[str, ...] = ()
  stream: int = 0
  read_heads: bool = True
  stateful: bool = False

  @property
  def members(self) -> tuple[str, ...]:
    return self.trains + tuple(r for r in self.reads if r not in self.trains)


class Method(abc.ABC):
  """Base class of a distillation method. Subclasses set `name` and override what they need."""

  name: str = ''
  # The role whose accuracy selects the best checkpoint and is reported as `eval/top1`.
  primary_role: str = 'student'
  # The (teacher feature, student feature) pairs a method distils, in order; () where it has none.
  layer_pairs: tuple[tuple[str, str], ...] = ()
  # Whether the train step needs each example's position in the train split (batch['index'],
  # stream 0): CRD's memory rows. The input pipeline supplies it where this is set.
  example_index: bool = False
  # The run's class count (the width of every role's logits), set by `create_method` where the
  # caller knows it (states.resolve does): for heads that classify (SOKD's auxiliary branch).
  num_classes: int | None = None

  @classmethod
  def check_config(cls, config) -> None:
    """Raises ValueError, naming field, value and what is valid, for a bad field of the method's
    own config block. Runs before anything is built."""
    del config

  @classmethod
  def steps_before_schedule(cls, config) -> int:
    """Steps the method runs before the configured schedule (`num_epochs` / `num_train_steps`)
    starts: the run is that much longer (IE-KD: its auto-encoder's steps). 0 by default."""
    del config
    return 0

  @classmethod
  @abc.abstractmethod
  def make_roles(cls, config) -> tuple[Role, ...]:
    """The networks of the method, trained or read."""

  def __init__(self, config, feature_shapes: FeatureShapes):
    """Resolves the method against its roles' feature shapes (layer pairs, head shapes)."""
    self._roles = type(self).make_roles(config)
    self.feature_shapes = feature_shapes
    self.logit_standardization = bool(config.logit_standardization)

  def __setattr__(self, name, value):
    if self.__dict__.get('_frozen', False):
      raise dataclasses.FrozenInstanceError(
          f'{type(self).__name__} is immutable once created; cannot set {name!r}.'
      )
    super().__setattr__(name, value)

  def freeze(self) -> None:
    """Called by create_method once the method is resolved."""
    object.__setattr__(self, '_frozen', True)

  def roles(self) -> tuple[Role, ...]:
    return self._roles

  def distillation_logits(self, logits: Array) -> Array:
    """The logits a logit-distillation term compares: `logits` as given, or with
    `config.logit_standardization` their per-example z-score over the classes
    (`losses.classification.standardize_logits`), for both sides of the term, before its
    temperature. Every logit-distillation call site goes through here; cross-entropy and
    accuracy always take the raw logits.

    Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024
    (sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py and DKD.py: `normalize`
    applied to the student's and the teacher's logits inside `kd_loss` / `dkd_loss` only). That
    code applies it to KD, DKD and MLKD; here it is one switch for every method's logit terms.
    Its CIFAR runs pair it with other weights (tools/train.py `--logit-stand --base-temp 2
    --kd-weight 9`: KD temperature 2 and weight 9; for DKD alpha x 9 and beta = the new alpha x 9,
    with DKD's own temperature left at 4); the switch changes no weight, set them in the method's
    block.
    """
    return standardize_logits(logits) if self.logit_standardization else logits

  def logit_kd(self, target_logits: Array, logits: Array, temperature: float) -> Array:
    """Hinton's KD term tau^2 KL(p(target) || p(logits)) of a method, its target stop-gradient,
    both sides through `distillation_logits` (losses.classification.softened_kl)."""
    return softened_kl(
        jax.lax.stop_gradient(self.distillation_logits(target_logits)),
        self.distillation_logits(logits),
        temperature,
    )

  def init_state(self, train_labels) -> Any:
    """The method's own state, a pytree of arrays carried in `TrainState.method_state`:
    replicated, checkpointed and restored with the roles, read and updated by its stateful
    phases (CRD: its memory of every train example's embeddings). `train_labels`: (N,) the
    train split's labels in index order, where the input pipeline knows them (else None).
    {} by default."""
    del train_labels
    return {}

  def heads(self, role: str) -> nn.Module | None:
    """The trainable extras of `role`, or None.

    The module is called as `heads(features, train=bool)` on the features of
    `head_input(role)` (already stop-gradient where that backbone is not updated, and always
    when it is another role's) and returns a dict. Heads train with their role's optimizer.
    """
    del role
    return None

  def pretrained_heads(
      self, role: str, heads: Mapping[str, Any], backbone: Mapping[str, Any]
  ) -> Mapping[str, Any]:
    """The heads' variables of a pre-trained role once its backbone is loaded.

    `heads` and `backbone` are `{'params': ..., 'batch_stats': ...}` (the heads' fresh ones and
    the backbone's from `config.teacher.checkpoint`). The trainer calls this once, when a run
    starts from scratch (not on resuming), for every `Role.pretrained` role with heads, and
    builds the role's optimizer state afterwards. By default the heads keep their fresh
    initialisation; SOKD's branch can start as a copy of the teacher's last stage and classifier.
    """
    del role, backbone
    return heads

  def head_input(self, role: str) -> str:
    """The role whose backbone features feed `role`'s heads: by default the role itself (FFKD's
    feedback regressors are the teacher's heads, fed by the student's maps)."""
    return role

  def phases(self) -> tuple[Phase, ...]:
    """The ordered updates of a train step. By default one phase of every role, whose loss is
    the method's `loss(outputs, labels, step) -> (per-role losses, metrics)`, which a method
    with its own phases need not define."""
    return (Phase('main', tuple(r.name for r in self.roles()), self.loss),)

  def num_streams(self) -> int:
    """How many train streams the phases read (1 + the largest `Phase.stream`)."""
    return 1 + max(p.stream for p in self.phases())

  def diagnostics(self, outputs: Mapping[str, RoleOutput]) -> Metrics:
    """Evaluation-time measurements on the diagnostics subset (e.g. CKA per layer pair)."""
    del outputs
    return {}

  def required_features(self) -> dict[str, tuple[str, ...]]:
    """Feature names each role must expose: by default, the two sides of `layer_pairs`."""
    if not self.layer_pairs:
      return {}
    return {
        'teacher': tuple(t for t, _ in self.layer_pairs),
        'student': tuple(s for _, s in self.layer_pairs),
    }


def gather(x: Array) -> Array:
  """This device's rows -> the global batch's rows (concatenated over the `data` axis).

  On one device that is `x` itself, returned as is: XLA's CPU backend would copy it (FFKD's
  stage maps, 12 of up to 16 MB a resnet32x4 step: 23 ms, 2026-12-01)."""
  if jax.lax.axis_size(DATA_AXIS) == 1:
    return x
  return jax.lax.all_gather(x, DATA_AXIS, tiled=True)


def gather_replicated(x: Array) -> Array:
  """`gather`, typed as the same value on every device (shard_map's replication check does not
  infer that of all_gather): each device places its rows in zeros, and psum adds them, exactly
  (every element is one device's value plus zeros). For what a step carries over to the next,
  e.g. a stateful phase's new method state; values read only within the step use `gather`."""
  rows = x.shape[0]
  placed = jnp.zeros((rows * jax.lax.axis_size(DATA_AXIS),) + x.shape[1:], x.dtype)
  placed = jax.lax.dynamic_update_slice_in_dim(
      placed, x, jax.lax.axis_index(DATA_AXIS) * rows, axis=0
  )
  return jax.lax.psum(placed, DATA_AXIS)
