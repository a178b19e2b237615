"""What the teacher-student methods share: their two roles, stage pairing, spatial resizing.

Stage pairing follows RepDistiller (HobbitLong/RepDistiller, train_student.py), which zips the
teacher's and the student's `feat[1:-1]` (every stage output, stem and pooled vector left out)
and pools the larger map down where sizes differ (distiller_zoo/AT.py). Our models name their
stage outputs `stage1..stageK` and some families expose one more stage than others (VGG's first
block, which RepDistiller counts as its stem), so stages are paired from the deepest end: the last
min(K_t, K_s) stages of each, in order. On RepDistiller's standard pairs (resnet, wrn, vgg ->
vgg / mobilenetv2, resnet32x4 -> shufflenet) this gives its pairs.
"""

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffkd_jax.losses.classification import top_k_correct
from ffkd_jax.methods.base import Method, Role, gather

Shapes = Mapping[str, jax.ShapeDtypeStruct]


def stage_names(shapes: Shapes) -> list[str]:
  """The post-activation stage outputs of a model, in order (stage1, stage2, ...)."""
  names = [k for k in shapes if k.startswith('stage') and not k.endswith('_preact')]
  return sorted(names, key=lambda k: int(k[len('stage') :]))


def last_stage(shapes: Shapes) -> str:
  names = stage_names(shapes)
  if not names:
    raise ValueError(
        f'the model exposes no stage outputs (stage1, ...); it has: '
        f'{", ".join(sorted(shapes))}.'
    )
  return names[-1]


def aligned_stage_pairs(
    teacher_shapes: Shapes, student_shapes: Shapes
) -> tuple[tuple[str, str], ...]:
  """(teacher, student) stage pairs: the last min(K_t, K_s) stages of each, deepest aligned."""
  teacher, student = stage_names(teacher_shapes), stage_names(student_shapes)
  count = min(len(teacher), len(student))
  return tuple(zip(teacher[len(teacher) - count :], student[len(student) - count :]))


def parse_pairs(spec: str, field: str) -> tuple[tuple[str, str], ...]:
  """'stage2:stage2,stage3:stage3' -> (('stage2', 'stage2'), ('stage3', 'stage3'))."""
  pairs = []
  for item in spec.split(','):
    names = [n.strip() for n in item.split(':')]
    if len(names) != 2 or not all(names):
      raise ValueError(
          f"config.{field}='{spec}' is not valid: give 'auto' or comma-separated "
          "teacher:student feature names, e.g. 'stage2:stage2,stage3:stage3'."
      )
    pairs.append(tuple(names))
  return tuple(pairs)


def check_names(shapes: Shapes, role: str, names, field: str) -> None:
  """Raises, naming the config field, when a feature name is not one the role's model has."""
  for name in names:
    if name not in shapes:
      raise ValueError(
          f"config.{field}: feature '{name}' of the {role} is not produced by its "
          f"model; it has: {', '.join(sorted(shapes))}."
      )


def check_pairs(feature_shapes, pairs, field: str) -> None:
  check_names(feature_shapes['teacher'], 'teacher', [t for t, _ in pairs], field)
  check_names(feature_shapes['student'], 'student', [s for _, s in pairs], field)


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

  def __init__(self, config):
    self._roles = teacher_student_roles(config)

  def roles(self):
    return self._roles

  def diagnostics(self, outputs):
    return prediction_agreement(outputs['teacher'].logits, outputs['student'].logits)


def prediction_agreement(
    teacher_logits: jax.Array, student_logits: jax.Array, key: str = 'agreement/teacher-student'
) -> dict[str, jax.Array]:
  """Share of the global batch where the two roles' top-1 classes agree."""
  teacher_top1 = jnp.argmax(gather(teacher_logits), axis=-1)  # (n,)
  return {key: jnp.mean(top_k_correct(gather(student_logits), teacher_top1, 1))}
