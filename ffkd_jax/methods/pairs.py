"""Stage names, layer-pair keys, pair parsing and 'auto' pairing: one helper for every method.

Stage pairing follows RepDistiller (HobbitLong/RepDistiller, train_student.py), which zips the
teacher's and the student's `feat[1:-1]` (every stage output, stem and pooled vector left out)
and is the layer list of its feature methods (distiller_zoo/AT.py, FitNet.py with
`--hint_layer 2`, SP.py and ICKD's last stage `feat[-2]`); `aligned_stage_pairs` gives those
pairs on its standard teacher-student pairs (resnet, wrn, vgg -> vgg / mobilenetv2, resnet32x4 ->
shufflenet; VGG's first block is its `stem`, not a stage). Where the two networks have different
numbers of stages (a 3-stage CIFAR ResNet against a 4-stage MobileNetV2), stages are paired from
the deepest end: the last min(K_t, K_s) stages of each, in order. (A plain `zip` of the two
lists, as wp502/SKD-RSL's FFKD code does, keeps the shallowest instead; equal counts agree.)

A model names its stage outputs `stage1..stageK` (DEVELOPERS.md). A method distils pairs
(teacher feature, student feature), given in its config block as 'auto' or as
'stage2:stage2,stage3:stage3'; `resolve_pairs` turns either into checked pairs.
"""

from typing import Callable, Mapping

import jax

Shapes = Mapping[str, jax.ShapeDtypeStruct]  # feature name -> shape of one role
Pairs = tuple[tuple[str, str], ...]


def stage_names(shapes: Mapping[str, object]) -> list[str]:
  """The post-activation stage outputs of a model, in order (stage1, stage2, ...)."""
  names = [k for k in shapes if k.startswith('stage') and not k.endswith('_preact')]
  return sorted(names, key=lambda k: int(k[len('stage') :]))


def last_stage(shapes: Shapes) -> str:
  names = stage_names(shapes)
  if not names:
    raise ValueError(
        'the model exposes no stage outputs (stage1, ...); it has: ' f'{", ".join(sorted(shapes))}.'
    )
  return names[-1]


def pair_key(pair: tuple[str, str]) -> str:
  """The name of a pair in metric keys and head outputs: 'stage2-stage3'."""
  return f'{pair[0]}-{pair[1]}'


def parse_pairs(spec: str, field: str) -> Pairs:
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


def resolve_pairs(
    spec: str,
    field: str,
    feature_shapes: Mapping[str, Shapes],
    auto: Callable[[Shapes, Shapes], Pairs],
    count: int | None = None,
) -> Pairs:
  """The checked (teacher, student) pairs of a config field: `auto(teacher, student)` for
  'auto', else the parsed list; `count` pairs exactly where given."""
  teacher, student = feature_shapes['teacher'], feature_shapes['student']
  pairs = auto(teacher, student) if spec == 'auto' else parse_pairs(spec, field)
  if count is not None and len(pairs) != count:
    raise ValueError(
        f"config.{field}='{spec}' is not valid: give 'auto' or exactly {count} "
        "teacher:student pair(s), e.g. 'stage2:stage2'."
    )
  check_names(teacher, 'teacher', [t for t, _ in pairs], field)
  check_names(student, 'student', [s for _, s in pairs], field)
  return tuple(pairs)


def aligned_stage_pairs(teacher_shapes: Shapes, student_shapes: Shapes) -> Pairs:
  """(teacher, student) stage pairs: the last min(K_t, K_s) stages of each, deepest aligned."""
  teacher, student = stage_names(teacher_shapes), stage_names(student_shapes)
  count = min(len(teacher), len(student))
  return tuple(zip(teacher[len(teacher) - count :], student[len(student) - count :]))


def last_stage_pair(teacher_shapes: Shapes, student_shapes: Shapes) -> Pairs:
  """The one pair of the two last stage outputs."""
  return ((last_stage(teacher_shapes), last_stage(student_shapes)),)


def middle_stage_pair(teacher_shapes: Shapes, student_shapes: Shapes) -> Pairs:
  """The middle pair of `aligned_stage_pairs`, index (K - 1) // 2 (FitNets' hint layer)."""
  pairs = aligned_stage_pairs(teacher_shapes, student_shapes)
  return (pairs[(len(pairs) - 1) // 2],)
