"""The model zoo, looked up by name: `create_model('resnet8x4', num_classes=100)`.

Every model is a `flax.linen.Module` called as

  (logits, features), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  logits, features = model.apply(variables, x, train=False)

with `x` NHWC float32 (`train` is keyword-only, with no default) and variables
`{'params', 'batch_stats'}`. `logits` is float32 whatever
the compute `dtype`; `features` holds `stage{i}`, `stage{i}_preact` (i = 1..K) and `embedding`,
described with their shapes in each family's module docstring.

Parameter names mirror the PyTorch state dicts of the RepDistiller / mdistiller / torchvision
zoo by one rule: a dotted PyTorch name becomes a Flax path by joining each Sequential or
ModuleList index to the name before it with '_' and splitting at the remaining dots, e.g.
`layer1.0.conv1.weight` -> `layer1_0/conv1/kernel`, `block1.layer.0.bn1.running_mean` ->
`block1/layer_0/bn1/mean` (in `batch_stats`), `blocks.0.0.conv.3.weight` ->
`blocks_0_0/conv_3/kernel`. Leaves: conv `weight` -> `kernel` (O, I/g, kh, kw) -> (kh, kw, I/g, O),
linear `weight` -> `kernel` transposed, batch norm `weight` -> `scale`, `bias` -> `bias`,
`running_mean` / `running_var` -> `mean` / `var`; `num_batches_tracked` has no counterpart.
"""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import (
    mobilenetv1,
    mobilenetv2,
    resnet_cifar,
    resnet_imagenet,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)

_CIFAR_SIZE = 32
_IMAGENET_SIZE = 224

# name -> (builder(name, num_classes, axis_name, dtype), input size)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int]] = {}
for _family in (resnet_cifar, wrn, vgg):
  for _name in _family.CONFIGS:
    _REGISTRY[_name] = (_family.build, _CIFAR_SIZE)
_REGISTRY['mobilenetv2'] = (mobilenetv2.build, _CIFAR_SIZE)
_REGISTRY['shufflenetv1'] = (shufflenetv1.build, _CIFAR_SIZE)
_REGISTRY['shufflenetv2'] = (shufflenetv2.build, _CIFAR_SIZE)
for _name in resnet_imagenet.CONFIGS:
  _REGISTRY[_name] = (
      resnet_imagenet.build,
      _CIFAR_SIZE if _name.endswith('_cifar') else _IMAGENET_SIZE,
  )
_REGISTRY['mobilenetv1'] = (mobilenetv1.build, _IMAGENET_SIZE)


def available_models() -> list[str]:
  """Every registered model name, sorted."""
  return sorted(_REGISTRY)


def _lookup(name: str, field: str) -> tuple[Callable[..., nn.Module], int]:
  if name not in _REGISTRY:
    raise ValueError(f"{field}: unknown model {name!r}; valid: {', '.join(available_models())}")
  return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int,
    axis_name: str | None = None,
    dtype=jnp.float32,
    *,
    field: str = 'config.model',
) -> nn.Module:
  """The model registered as `name`, with a `num_classes`-way classifier.

  `axis_name` is the mapped axis batch norm reduces its training statistics over (`'data'`
  inside the data-parallel step; `None` for single-device use). `dtype` is the compute
  dtype; parameters are float32. `field` names the config field in error messages.
  """
  build, _ = _lookup(name, field)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
  return build(name, num_classes, axis_name, dtype)


# The families with a partial forward (their `first_stage` field): CIFAR ResNets and WRNs.
_TAIL_FAMILIES = (resnet_cifar, wrn)


def tail_models() -> list[str]:
  """The models `create_tail` supports, sorted."""
  return sorted(name for family in _TAIL_FAMILIES for name in family.CONFIGS)


def create_tail(
    name: str,
    num_classes: int,
    axis_name: str | None = None,
    dtype=jnp.float32,
    *,
    field: str = 'config.model',
) -> nn.Module:
  """The last stage, pooling and classifier of model `name`, as a module of their own.

  It is the model with `first_stage` = its last stage K: called as `create_model`'s models are,
  on the output map of stage K-1 (`features[f'stage{tail.first_stage - 1}']`) instead of images,
  it returns `(logits, {'stage{K}', 'stage{K}_preact', 'embedding'})`. Its submodules carry the
  full model's names, so the full model's variables of that stage and the classifier, taken by
  key, are the tail's (SOKD's auxiliary branch is initialised that way). Raises ValueError naming
  `field` for a model without a partial forward.
  """
  _lookup(name, field)
  if name not in tail_models():
    raise ValueError(
        f'{field}={name!r} has no partial forward (its last stage and classifier on an inner '
        f"map); models that have one: {', '.join(tail_models())}."
    )
  model = create_model(name, num_classes, axis_name, dtype, field=field)
  return model.clone(first_stage=model.num_stages)


def model_input_size(name: str, *, field: str = 'config.model') -> int:
  """The input resolution `name` was designed for: 32 (CIFAR) or 224 (ImageNet)."""
  _, size = _lookup(name, field)
  return size


__all__ = ['available_models', 'create_model', 'create_tail', 'model_input_size', 'tail_models']
