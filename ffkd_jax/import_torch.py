"""PyTorch CIFAR KD zoo checkpoints (RepDistiller / CRD naming) as ffkd_jax teacher checkpoints.

  python -m ffkd_jax.import_torch --arch resnet32x4 --checkpoint teacher.pth --out DIR \
      [--num-classes 100] [--overwrite]

writes DIR as a checkpoint step directory (`DIR/state`, `DIR/meta`, the layout the trainer's
`Checkpoints` writes), so that `config.teacher.checkpoint=DIR` loads it as the teacher through
`checkpoint.load_pretrained_role`. The state holds one role, `model` (as a CE run would):
`roles/model/params/backbone` and `roles/model/batch_stats/backbone`; the meta is
`{'roles': {'model': arch}, 'num_classes', 'method': 'imported_torch', 'source'}`.

A `.pth` file may hold `{'model': state_dict, ...}` (RepDistiller's `train_teacher.py`),
`{'state_dict': state_dict, ...}` or a bare state dict; a `module.` prefix (DataParallel) is
dropped. Names map by the rule in `ffkd_jax.models` (`layer1.0.conv1.weight` ->
`layer1_0/conv1/kernel`); layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out), batch norm
weight / bias / running_mean / running_var -> scale / bias / mean / var; `num_batches_tracked`
is dropped. Every tensor is checked against the Flax model: missing and unexpected names and
shape mismatches are reported together, with a guess at the checkpoint's architecture.

`arch` is a registry name (`ffkd_jax.models.available_models()`); RepDistiller's names for the
four models registered under other names (`ResNet50`, `mobile_half`, `ShuffleV1`, `ShuffleV2`)
are accepted too. Conversion itself needs no torch; reading a `.pth` file does
(`pip install 'ffkd_jax[torch]'`).
"""

import argparse
import functools
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ffkd_jax import models

# RepDistiller's model_dict names of the models registered here under other names.
REPDISTILLER_NAMES = {
    'ResNet50': 'resnet50_cifar',
    'mobile_half': 'mobilenetv2',
    'ShuffleV1': 'shufflenetv1',
    'ShuffleV2': 'shufflenetv2',
}
ROLE = 'model'  # the role of the written checkpoint, as a CE run's
_SHOWN = 5  # names listed per kind of problem in an error

# Flax leaf -> PyTorch leaf.
_TORCH_LEAF = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
_IGNORED_LEAVES = ('num_batches_tracked',)


def resolve_arch(arch: str) -> str:
  """The registry name of `arch` (a registry name or a RepDistiller alias); ValueError if none."""
  arch = REPDISTILLER_NAMES.get(arch, arch)
  if arch not in models.available_models():
    raise ValueError(
        f"--arch: unknown architecture {arch!r}; valid: {', '.join(models.available_models())} "
        f"(or RepDistiller's {', '.join(REPDISTILLER_NAMES)})."
    )
  return arch


def torch_name(collection: str, path: Sequence[str]) -> str:
  """The PyTorch state-dict name of a Flax variable: ('params', ('layer1_0', 'conv1', 'kernel'))
  -> 'layer1.0.conv1.weight' (the inverse of the rule in `ffkd_jax.models`)."""
  *modules, leaf = path
  dotted = [re.sub(r'_(\d+)(?=_|$)', r'.\1', m) for m in modules]
  return '.'.join(dotted + [_TORCH_LEAF[(collection, leaf)]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """A Flax kernel shape in PyTorch's layout (other leaves are the same in both)."""
  if len(flax_shape) == 4:  # (kh, kw, in / groups, out) -> (out, in / groups, kh, kw)
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2:  # (in, out) -> (out, in)
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # OIHW -> HWIO
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:  # (out, in) -> (in, out)
    return array.T
  return array


@functools.lru_cache(maxsize=None)
def _template(arch: str, num_classes: int) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
  """PyTorch name -> (Flax collection, Flax path, PyTorch-layout shape) of every variable."""
  model = models.create_model(arch, num_classes, field='--arch')
  size = models.model_input_size(arch)
  variables = jax.eval_shape(
      functools.partial(model.init, train=False),
      jax.random.key(0),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
  )
  template = {}
  for collection in ('params', 'batch_stats'):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
    for path, leaf in flat.items():
      template[torch_name(collection, path)] = (collection, path, _torch_shape(leaf.shape))
  return template


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor or array as a NumPy array; floating tensors become float32."""
  if hasattr(value, 'detach'):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  array = np.asarray(value)
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def unwrap_state_dict(loaded: Any) -> dict[str, Any]:
  """The state dict in a loaded `.pth` object, without a `module.` prefix."""
  state_dict = loaded
  if isinstance(loaded, Mapping):
    for key in ('model', 'state_dict', 'net'):
      if isinstance(loaded.get(key), Mapping):
        state_dict = loaded[key]
        break
  if not isinstance(state_dict, Mapping) or not all(
      hasattr(v, 'shape') for v in state_dict.values()
  ):
    keys = sorted(map(str, loaded)) if isinstance(loaded, Mapping) else []
    raise ValueError(
        f"expected a state dict (name -> tensor), or a dict holding one under 'model' or "
        f"'state_dict'; got {type(loaded).__name__}" + (f' with keys {keys[:10]}' if keys else '')
    )
  prefix = 'module.'
  if state_dict and all(str(k).startswith(prefix) for k in state_dict):
    return {str(k)[len(prefix) :]: v for k, v in state_dict.items()}
  return {str(k): v for k, v in state_dict.items()}


def _listing(names: Sequence[str]) -> str:
  shown = ', '.join(names[:_SHOWN])
  return shown + (f', ... ({len(names)} in all)' if len(names) > _SHOWN else '')


def _guess_arch(shapes: Mapping[str, tuple], exclude: str, num_classes: int) -> str | None:
  """A registered architecture whose names and conv shapes are those of `shapes`, if any.

  Conv shapes do not depend on the class count, so a checkpoint with another class count is
  recognised too. Candidates of the same family (module class) as `exclude` come first, then
  those of its input size: each costs a trace of the model.
  """
  size = models.model_input_size(exclude)
  family = type(models.create_model(exclude, num_classes))
  candidates = sorted(
      (name for name in models.available_models() if name != exclude),
      key=lambda name: (
          type(models.create_model(name, num_classes)) is not family,
          models.model_input_size(name) != size,
      ),
  )
  for name in candidates:
    template = _template(name, num_classes)
    if set(template) != set(shapes):
      continue
    if all(shape == shapes[key] for key, (_, _, shape) in template.items() if len(shape) == 4):
      return name
  return None


def convert_state_dict(
    arch: str, state_dict: Mapping[str, Any], num_classes: int
) -> tuple[dict, dict]:
  """A PyTorch state dict of `arch` as Flax `(params, batch_stats)` (nested dicts of float32).

  `state_dict` maps names to torch tensors or arrays (a `module.` prefix is dropped; so are
  `num_batches_tracked` entries). Raises ValueError listing missing and unexpected names and
  shape mismatches (both shapes, in PyTorch's layout), with a guess at the architecture.
  """
  arch = resolve_arch(arch)
  template = _template(arch, num_classes)
  state_dict = unwrap_state_dict(state_dict)
  arrays = {
      k: _to_numpy(v) for k, v in state_dict.items() if k.rsplit('.', 1)[-1] not in _IGNORED_LEAVES
  }

  missing = [k for k in template if k not in arrays]
  unexpected = [k for k in arrays if k not in template]
  mismatched = [
      k for k, (_, _, shape) in template.items() if k in arrays and tuple(arrays[k].shape) != shape
  ]
  if missing or unexpected or mismatched:
    problems = []
    if missing:
      problems.append(f'missing keys: {_listing(missing)}')
    if unexpected:
      problems.append(f'unexpected keys: {_listing(unexpected)}')
    if mismatched:
      shown = [
          f"'{k}' is {tuple(arrays[k].shape)} in the checkpoint, {template[k][2]} in the " 'model'
          for k in mismatched
      ]
      problems.append(f'shape mismatches: {_listing(shown)}')
    hint = ''
    dense = [k for k, (_, _, shape) in template.items() if len(shape) == 2]
    classifier = set(dense) | {k[: -len('weight')] + 'bias' for k in dense}
    if mismatched and set(mismatched) <= classifier and not missing and not unexpected:
      classes = arrays[mismatched[0]].shape[0]
      hint = f' Its classifier has {classes} outputs: pass --num-classes {classes}.'
    else:
      guess = _guess_arch({k: tuple(v.shape) for k, v in arrays.items()}, arch, num_classes)
      if guess:
        hint = f" It looks like a '{guess}' checkpoint, not '{arch}': pass --arch {guess}."
    message = (
        f"the state dict does not match '{arch}' with {num_classes} classes.{hint} "
        f'({len(arrays)} tensors given, {len(template)} expected): ' + '; '.join(problems) + '.'
    )
    raise ValueError(message)

  params, batch_stats = {}, {}
  for key, (collection, path, _) in template.items():
    target = params if collection == 'params' else batch_stats
    target[path] = _to_flax_layout(arrays[key]).astype(np.float32)
  return (flax.traverse_util.unflatten_dict(params), flax.traverse_util.unflatten_dict(batch_stats))


def load_torch_file(path: str) -> dict[str, Any]:
  """The state dict in a `.pth` file, read with `torch.load(weights_only=True)` on the CPU."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "reading a PyTorch checkpoint needs torch: pip install 'ffkd_jax[torch]'"
    ) from error
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--checkpoint: no file at '{path}'")
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f"--checkpoint='{path}' does not load with torch.load(weights_only=True) "
        f'({type(error).__name__}: {str(error)[:300]}). If it pickles more than tensors and '
        'plain containers, re-save just its state dict: '
        "torch.save({'model': model.state_dict()}, path)."
    ) from error
  return unwrap_state_dict(loaded)


def import_checkpoint(
    arch: str, path: str, out_dir: str, num_classes: int = 100, *, overwrite: bool = False
) -> dict:
  """Converts the PyTorch checkpoint at `path` into the checkpoint step directory `out_dir`.

  Returns the meta written. `out_dir` must not exist unless `overwrite`.
  """
  arch = resolve_arch(arch)
  params, batch_stats = convert_state_dict(arch, load_torch_file(path), num_classes)
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"--out='{out_dir}' exists; pass --overwrite to replace it.")
  state = {
      'roles': {ROLE: {'params': {'backbone': params}, 'batch_stats': {'backbone': batch_stats}}}
  }
  meta = {
      'roles': {ROLE: arch},
      'num_classes': num_classes,
      'method': 'imported_torch',
      'source': os.path.abspath(path),
  }
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    checkpointer.save(
        out_dir,
        ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=overwrite,
    )
  finally:
    checkpointer.close()
  return meta


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ffkd_jax.import_torch',
      description='Convert a PyTorch CIFAR KD zoo checkpoint (RepDistiller naming) into an '
      'ffkd_jax checkpoint to use as config.teacher.checkpoint.',
  )
  parser.add_argument(
      '--arch', required=True, help='registry name, e.g. resnet32x4 (see ffkd_jax.models)'
  )
  parser.add_argument('--checkpoint', required=True, help='the .pth file')
  parser.add_argument('--out', required=True, help='checkpoint step directory to write')
  parser.add_argument('--num-classes', type=int, default=100)
  parser.add_argument('--overwrite', action='store_true', help='replace --out if it exists')
  args = parser.parse_args(argv)
  try:
    meta = import_checkpoint(
        args.arch, args.checkpoint, args.out, args.num_classes, overwrite=args.overwrite
    )
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
    print(f'import_torch: error: {error}', file=sys.stderr)
    return 1
  print(
      f"Wrote '{meta['roles'][ROLE]}' ({meta['num_classes']} classes) from "
      f"{meta['source']} to {os.path.abspath(args.out)}; use it as "
      f'config.teacher.checkpoint={os.path.abspath(args.out)} with '
      f"config.teacher.model='{meta['roles'][ROLE]}'."
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
