"""The distiller interface: what a method needs from the trainer, and nothing more.

A method names its roles (the networks it trains or reads: a teacher and a student, or peers),
the trainable extras ("heads": connectors, auto-encoders) each role carries, and a loss per
role. The trainer runs one forward pass of every role, sums the role losses, takes one backward
pass with respect to every trainable parameter, and applies each role's optimizer. Stop-gradients
inside a method's loss make that sum give each role exactly the gradient of its own loss.

`loss` runs inside the data-parallel step (shard_map over the `data` axis) on this device's
rows: cross-entropy-like terms are local batch means; statistics over the batch are taken on the
global batch with `gather` (see DEVELOPERS.md).
"""

import abc
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax

from ffkd_jax.parallel import DATA_AXIS

Array = jax.Array
Metrics = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Role:
  """One network of a method.

  name: key of the role ('teacher', 'student', 'peer0', ...).
  model: registry name of its backbone.
  train_backbone: whether the backbone is updated (else: inference-mode batch norm, no optimizer
    state and no backward pass through it). Heads, if any, are always trained.
  pretrained: whether the backbone is loaded from `config.teacher.checkpoint`.
  lr_scale: its learning rate over the base schedule's.
  """

  name: str
  model: str
  train_backbone: bool = True
  pretrained: bool = False
  lr_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class RoleOutput:
  """What one forward pass of a role gives the loss (this device's rows)."""

  logits: Array  # (n, classes)
  features: Mapping[str, Array]  # backbone features by name
  heads: Mapping[str, Any]  # outputs of the role's heads, {} without heads


class Method(abc.ABC):
  """Base class of a distillation method. Subclasses set `name` and override what they need."""

  name: str = ''
  # The role whose accuracy selects the best checkpoint and is reported as `eval/top1`.
  primary_role: str = 'student'

  @abc.abstractmethod
  def roles(self) -> tuple[Role, ...]:
    """The networks of the method, trained or read."""

  def setup(self, feature_shapes: Mapping[str, Mapping[str, jax.ShapeDtypeStruct]]) -> None:
    """Called once with every role's feature shapes before `heads` (e.g. to pick layer pairs)."""
    del feature_shapes

  def heads(
      self, role: str, feature_shapes: Mapping[str, Mapping[str, jax.ShapeDtypeStruct]]
  ) -> nn.Module | None:
    """The trainable extras of `role`, or None. feature_shapes: role -> feature name -> shape.

    The module is called as `heads(features, train=bool)` on the role's own features (already
    stop-gradient where its backbone is frozen) and returns a dict.
    """
    del role, feature_shapes
    return None

  def role_active(self, role: str, step: Array) -> Array | bool:
    """Whether `role` is updated at `step` (a traced scalar); a method may start a role late."""
    del role, step
    return True

  @abc.abstractmethod
  def loss(
      self, outputs: Mapping[str, RoleOutput], labels: Array, step: Array
  ) -> tuple[dict[str, Array], Metrics]:
    """Per-role losses (each a scalar) and metrics. Runs inside the data-parallel step."""

  def diagnostics(self, outputs: Mapping[str, RoleOutput]) -> Metrics:
    """Evaluation-time measurements on one global eval batch (e.g. CKA per layer pair)."""
    del outputs
    return {}

  def required_features(self) -> dict[str, tuple[str, ...]]:
    """Feature names each role must expose (checked at start-up against the models)."""
    return {}


def gather(x: Array) -> Array:
  """This device's rows -> the global batch's rows (concatenated over the `data` axis)."""
  return jax.lax.all_gather(x, DATA_AXIS, tiled=True)
