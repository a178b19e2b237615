"""What the teacher-student methods share: their two roles, spatial resizing, config checks.

Where two paired maps differ in size, the larger is average-pooled down to the smaller
(RepDistiller, HobbitLong/RepDistiller distiller_zoo/AT.py); layer pairing is
ffkd_jax/methods/pairs.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffkd_jax.losses.classification import top_k_correct
from ffkd_jax.methods.base import Method, Role, gather
from ffkd_jax.methods.pairs import Pairs


def spatial_size(shape: jax.ShapeDtypeStruct) -> tuple[int, int]:
  return tuple(shape.shape[1:3])


def check_poolable(larger: tuple[int, int], smaller: tuple[int, int], what: str) -> None:
  """Raises unless the map of size `larger` average-pools exactly onto `smaller`."""
  if any(a < b or a % b for a, b in zip(larger, smaller)):
    raise ValueError(
        f'{what}: a {larger[0]}x{larger[1]} map cannot be average-pooled to '
        f'{smaller[0]}x{smaller[1]} (sizes must divide); pick other layers.'
    )


def common_size(a: tuple[int, int], b: tuple[int, int], what: str) -> tuple[int, int]:
  """The smaller of two spatial sizes, checked so that the larger pools onto it."""
  small = (min(a[0], b[0]), min(a[1], b[1]))
  for size in (a, b):
    check_poolable(size, small, what)
  return small


def pool_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(n, h, w, c) -> (n, size[0], size[1], c) by average pooling with a window of h/size."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  window = (h // size[0], w // size[1])
  return nn.avg_pool(x, window, strides=window)


def pool_to_smaller(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pools the spatially larger of two NHWC maps down to the other's size."""
  size = (min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2]))
  return pool_to(a, size), pool_to(b, size)


def teacher_student_roles(config) -> tuple[Role, Role]:
  """A frozen pre-trained `config.teacher.model` and a `config.model` student trained from
  scratch."""
  return (
      Role('teacher', config.teacher.model, train_backbone=False, pretrained=True),
      Role('student', config.model),
  )


class TeacherStudent(Method):
  """Base of the methods that distil a frozen, pre-trained teacher into a student."""

  @classmethod
  def make_roles(cls, config):
    return teacher_student_roles(config)

  def diagnostics(self, outputs):
    return prediction_agreement(outputs['teacher'].logits, outputs['student'].logits)


def prediction_agreement(
    teacher_logits: jax.Array, student_logits: jax.Array, key: str = 'agreement/teacher-student'
) -> dict[str, jax.Array]:
  """Share of the global batch where the two roles' top-1 classes agree."""
  teacher_top1 = jnp.argmax(gather(teacher_logits), axis=-1)  # (n,)
  return {key: jnp.mean(top_k_correct(gather(student_logits), teacher_top1, 1))}


def linear_warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
  """min((step + 1) / warmup_steps, 1): a loss weight's per-step ramp (DKD's and ReviewKD's
  warm-up epochs as steps); warmup_steps = 1: no ramp."""
  ramp = (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps
  return jnp.minimum(ramp, 1.0)


def check_positive(config, *fields: str, what: str = 'must be a finite number > 0') -> None:
  """Raises for the first of the dotted `fields` of config that is not a finite number > 0."""
  for field in fields:
    value = config
    for part in field.split('.'):
      value = value[part]
    try:
      ok = value > 0 and math.isfinite(value)
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f'config.{field}={value!r} is not valid: {what}.')


def check_weights(config, *fields: str) -> None:
  """Raises for the first of the dotted loss-weight `fields` of config that is not a finite
  number >= 0."""
  for field in fields:
    value = config
    for part in field.split('.'):
      value = value[part]
    try:
      ok = value >= 0 and math.isfinite(value)
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(
          f'config.{field}={value!r} is not valid: a weight must be a finite number >= 0.'
      )


def check_at_least(config, field: str, minimum: int, why: str = '') -> None:
  """Raises unless the dotted integer `field` of config is >= minimum."""
  value = config
  for part in field.split('.'):
    value = value[part]
  if int(value) < minimum:
    raise ValueError(f'config.{field}={value!r} is not valid: {why}it must be >= {minimum}.')


def check_temperatures(config, *fields: str) -> None:
  check_positive(config, *fields, what='a temperature must be a finite number > 0')


def check_poolable_pairs(feature_shapes, pairs: Pairs, field: str) -> None:
  """Raises unless each pair's larger map average-pools exactly onto the smaller one."""
  for t_name, s_name in pairs:
    common_size(
        spatial_size(feature_shapes['teacher'][t_name]),
        spatial_size(feature_shapes['student'][s_name]),
        f'config.{field} {t_name}:{s_name}',
    )
