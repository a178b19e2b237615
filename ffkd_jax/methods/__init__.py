"""Distillation methods by name: `create_method(config)` reads `config.method`."""

from ffkd_jax.methods.at import AT
from ffkd_jax.methods.base import Method, Role, RoleOutput, gather
from ffkd_jax.methods.cc import CC
from ffkd_jax.methods.ce import CrossEntropy
from ffkd_jax.methods.dist import DIST
from ffkd_jax.methods.dml import DML
from ffkd_jax.methods.ffkd import FFKD, PRESETS as FFKD_PRESETS
from ffkd_jax.methods.fitnet import FitNet
from ffkd_jax.methods.ickd import ICKD
from ffkd_jax.methods.iedml import IEDML
from ffkd_jax.methods.iekd import IEKD
from ffkd_jax.methods.kd import KD
from ffkd_jax.methods.rkd import RKD
from ffkd_jax.methods.sp import SP

_REGISTRY = {
    'ce': CrossEntropy,
    # Logit and relation distillation from a frozen teacher.
    'kd': KD,
    'dist': DIST,
    'rkd': RKD,
    'cc': CC,
    # Feature distillation from a frozen teacher.
    'fitnet': FitNet,
    'at': AT,
    'sp': SP,
    'ickd': ICKD,
    'iekd': IEKD,
    # Online: peers trained together from scratch.
    'dml': DML,
    'iedml': IEDML,
}
_REGISTRY.update({preset: FFKD for preset in FFKD_PRESETS})


def available_methods() -> list[str]:
  return sorted(_REGISTRY)


def create_method(config) -> Method:
  if config.method not in _REGISTRY:
    raise ValueError(
        f"config.method='{config.method}' is not a method; valid: "
        f"{', '.join(available_methods())}."
    )
  return _REGISTRY[config.method](config)


__all__ = ['Method', 'Role', 'RoleOutput', 'gather', 'available_methods', 'create_method']
