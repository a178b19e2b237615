"""Distillation methods by name: `create_method(config, feature_shapes)` reads `config.method`.

Adding a method: a loss file (ffkd_jax/losses/), a method file (here), a config block
(ffkd_jax/defaults.py) and a line in `_REGISTRY`; the tests enumerate the registry.
"""

from ffkd_jax.methods.at import AT
from ffkd_jax.methods.base import FeatureShapes, Method, Role, RoleOutput, gather
from ffkd_jax.methods.cc import CC
from ffkd_jax.methods.ccs import CCS
from ffkd_jax.methods.cd import CD
from ffkd_jax.methods.ce import CrossEntropy
from ffkd_jax.methods.crd import CRD
from ffkd_jax.methods.dist import DIST
from ffkd_jax.methods.dkd import DKD
from ffkd_jax.methods.dml import DML
from ffkd_jax.methods.ffkd import FFKD, PRESETS as FFKD_PRESETS
from ffkd_jax.methods.fitnet import FitNet
from ffkd_jax.methods.ickd import ICKD
from ffkd_jax.methods.iedml import IEDML
from ffkd_jax.methods.iekd import IEKD
from ffkd_jax.methods.kd import KD
from ffkd_jax.methods.kdcl import KDCL
from ffkd_jax.methods.reviewkd import ReviewKD
from ffkd_jax.methods.rkd import RKD
from ffkd_jax.methods.sokd import SOKD
from ffkd_jax.methods.sp import SP

_REGISTRY = {
    'ce': CrossEntropy,
    # Logit and relation distillation from a frozen teacher.
    'kd': KD,
    'dkd': DKD,
    'dist': DIST,
    'rkd': RKD,
    'cc': CC,
    # Feature distillation from a frozen teacher.
    'fitnet': FitNet,
    'at': AT,
    'sp': SP,
    'ickd': ICKD,
    'iekd': IEKD,
    'cd': CD,
    'ccs': CCS,
    'reviewkd': ReviewKD,
    # Contrastive: a memory of every train example (method state, example indices).
    'crd': CRD,
    # Online: peers trained together from scratch.
    'dml': DML,
    'kdcl': KDCL,
    'iedml': IEDML,
    # Semi-online: a frozen teacher's trainable branch and the student learn from each other.
    'sokd': SOKD,
}
_REGISTRY.update({preset: FFKD for preset in FFKD_PRESETS})


def available_methods() -> list[str]:
  return sorted(_REGISTRY)


def method_class(config) -> type[Method]:
  """The class of `config.method`; raises naming the value and the valid names."""
  if config.method not in _REGISTRY:
    raise ValueError(
        f"config.method='{config.method}' is not a method; valid: "
        f"{', '.join(available_methods())}."
    )
  return _REGISTRY[config.method]


def check_config(config) -> None:
  """The method's own checks of its config block (before anything is built)."""
  method_class(config).check_config(config)


def method_roles(config) -> tuple[Role, ...]:
  """The roles of `config.method`, before any model exists (their models give feature shapes)."""
  return method_class(config).make_roles(config)


def create_method(config, feature_shapes: FeatureShapes, num_classes: int | None = None) -> Method:
  """The resolved, immutable method: its config block checked, its layer pairs chosen from the
  roles' feature shapes, every feature it reads checked against its roles' models;
  `num_classes` (the logits' width) becomes `Method.num_classes`."""
  cls = method_class(config)
  cls.check_config(config)
  method = cls(config, feature_shapes)
  method.num_classes = num_classes
  check_features(method, feature_shapes)
  method.freeze()
  return method


def check_features(method: Method, feature_shapes: FeatureShapes) -> None:
  """Every feature a method asks of a role must be one the role's model produces."""
  for role, names in method.required_features().items():
    available = sorted(feature_shapes[role])
    for name in names:
      if name not in feature_shapes[role]:
        raise ValueError(
            f"feature '{name}' of the {role} (config.method='{method.name}', e.g. "
            f'config.ffkd.layer_pairs) is not produced by its model; it has: '
            f"{', '.join(available)}."
        )


__all__ = [
    'FeatureShapes',
    'Method',
    'Role',
    'RoleOutput',
    'available_methods',
    'check_config',
    'create_method',
    'gather',
    'method_class',
    'method_roles',
]
