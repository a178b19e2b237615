"""Orbax checkpoints of a run, and loading a pre-trained teacher.

Layout under the workdir:
  checkpoints/<step>/{state, meta}   the last `keep_checkpoints`, every N steps and at the end
  best/<step>/{state, meta}          the best by validation top-1 (one kept)
`state` is the whole TrainState as a plain tree (every role's parameters, batch statistics and
optimizer state, the step, which is also the input position); `meta` is JSON: the method, each
role's model, the class count, and the evaluation that made it.

Saving is asynchronous; orbax writes into a temporary directory (`<step>.orbax-checkpoint-tmp*`,
never listed as a step, replaced when that step is saved again) and renames it when complete;
only then are steps beyond `keep_checkpoints` deleted, so the last good checkpoint stays until a
newer one is whole. Parameters or batch statistics that are not finite are never saved.

`meta` also holds `state_digest`, a SHA-256 of every array of `state`: orbax reads a damaged file
without complaint where only array bytes changed (a flipped bit restores as a wrong number), so
a restore is checked against it. A checkpoint that fails to restore, or restores with another
digest, is skipped for the previous one with a warning naming both steps, and is replaced when
the run saves that step again. Where checkpoints exist but none restores, the run stops (rather
than start over and lose them).
"""

import hashlib
import os
from typing import Any, Mapping

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ffkd_jax.states import TrainState


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


DIGEST_KEY = 'state_digest'


def _saved_tree(state: TrainState) -> dict:
  """The TrainState as the plain tree a checkpoint holds; an empty `method_state` (every method
  but those with state, e.g. CRD's memory) is left out, so that checkpoints written before the
  field existed restore as they are."""
  tree = dict(flax.serialization.to_state_dict(state))
  if not jax.tree.leaves(tree.get('method_state', {})):
    tree.pop('method_state', None)
  return tree


def state_digest(tree: Any) -> str:
  """SHA-256 of a tree's arrays: each leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _describe(error: Exception) -> str:
  """One line: the error's type and the start of its message (orbax's run to pages)."""
  return f'{type(error).__name__}: {" ".join(str(error).split())[:300]}'


class CorruptCheckpointError(ValueError):
  """A checkpoint that does not restore, or restores other arrays than were saved."""


def check_digest(tree: Any, meta: Mapping[str, Any], where: str) -> None:
  """Raises CorruptCheckpointError where meta has a digest that `tree` does not match."""
  expected = meta.get(DIGEST_KEY)
  if expected is not None and state_digest(tree) != expected:
    raise CorruptCheckpointError(
        f'{where}: the restored arrays do not match the digest saved ' 'with them (a damaged file).'
    )


def _options(directory: str, keep: int) -> ocp.CheckpointManagerOptions:
  """Async saving, keeping `keep`. With several processes, every manager needs barrier names of
  its own: two managers (latest and best, or a chain's teacher and student runs) counting their
  saves from 1 would otherwise meet at the same barrier ('... is already ongoing')."""
  prefix = 'ffkd-' + hashlib.sha1(directory.encode()).hexdigest()[:12]
  return ocp.CheckpointManagerOptions(
      max_to_keep=max(1, keep),
      create=True,
      enable_async_checkpointing=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix),
  )


class Checkpoints:
  """The latest-k and best managers of one workdir."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    best_directory = os.path.join(os.path.abspath(workdir), 'best')
    self.latest = ocp.CheckpointManager(self.directory, options=_options(self.directory, keep))
    self._unrestorable: set[int] = set()  # latest steps that failed to restore
    self.best = ocp.CheckpointManager(best_directory, options=_options(best_directory, 1))

  def save(self, state: TrainState, meta: Mapping[str, Any], best: bool = False) -> None:
    """Saves `state` at its step (asynchronously); refuses non-finite parameters."""
    step = int(jax.device_get(state.step))
    tree = _saved_tree(state)
    host = jax.device_get(tree)
    for name, role in host['roles'].items():
      for part in ('params', 'batch_stats'):
        bad = [
            jax.tree_util.keystr(path)
            for path, x in jax.tree_util.tree_leaves_with_path(role[part])
            if not np.all(np.isfinite(x))
        ]
        if bad:
          raise FloatingPointError(
              f'refusing to checkpoint step {step}: {part} of role '
              f"'{name}' are not finite ({len(bad)} arrays, e.g. {bad[0]})."
          )
    bad = [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(host.get('method_state', {}))
        if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(np.isfinite(x))
    ]
    if bad:
      raise FloatingPointError(
          f'refusing to checkpoint step {step}: the method state is not finite ({bad[0]}).'
      )
    manager = self.best if best else self.latest
    if not best and step in self._unrestorable:
      logging.warning('replacing the checkpoint at step %d, which did not restore.', step)
      manager.wait_until_finished()
      manager.delete(step)
      self._unrestorable.discard(step)
    if step in manager.all_steps():
      return
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        meta=ocp.args.JsonSave(dict(meta, step=step, **{DIGEST_KEY: state_digest(host)})),
    )
    manager.save(step, args=args, force=True)

  def restore_latest(self, template: TrainState) -> tuple[TrainState, dict] | None:
    """The newest checkpoint that restores, shaped and placed like `template`.

    None where there is none (temporary directories of unfinished saves do not count). Raises
    RuntimeError where there are checkpoints but none restores.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    abstract = _abstract(_saved_tree(template))
    failures = []
    for index, step in enumerate(steps):
      try:
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        check_digest(restored['state'], restored['meta'], f'checkpoint at step {step}')
      except Exception as error:  # pylint: disable=broad-except
        self._unrestorable.add(step)
        failures.append(f'step {step}: {_describe(error)}')
        fallback = steps[index + 1] if index + 1 < len(steps) else None
        logging.warning(
            'checkpoint at step %d in %s does not restore (%s); falling back to %s.',
            step,
            self.directory,
            _describe(error),
            f'step {fallback}' if fallback is not None else 'none (no other left)',
        )
        continue
      tree = dict(restored['state'])
      # Left out of the saved tree where it has no arrays: the template's (empty) one.
      template_tree = flax.serialization.to_state_dict(template)
      if 'method_state' in template_tree:
        tree.setdefault('method_state', template_tree['method_state'])
      return flax.serialization.from_state_dict(template, tree), dict(restored['meta'])
    if failures:
      raise RuntimeError(
          f'none of the checkpoints in {self.directory} restores ({"; ".join(failures)}). If '
          'the config changed since they were written (e.g. config.model or config.method), '
          'use a new --workdir; to start this run over, move that directory away.'
      )
    return None

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _checkpoint_step_dirs(path: str) -> list[tuple[int, str]]:
  """(step, directory) of the checkpoints at `path`: a workdir, a manager dir or a step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    return [(-1, path)]
  for sub in ('best', 'checkpoints', ''):
    root = os.path.join(path, sub)
    if not os.path.isdir(root):
      continue
    steps = sorted(
        (int(d), os.path.join(root, d))
        for d in os.listdir(root)
        if d.isdigit() and os.path.isdir(os.path.join(root, d, 'state'))
    )
    if steps:
      return steps[::-1]
  return []


def find_checkpoint(path: str) -> tuple[str, dict] | None:
  """(step directory, meta) of the checkpoint `path` names, or None where it holds none.

  path: a workdir (its best checkpoint, else its latest), a manager directory, or a step
  directory. meta has the run's `method`, `roles` (role -> model name), `num_classes`,
  `image_size` and `step`.
  """
  candidates = _checkpoint_step_dirs(path)
  if not candidates:
    return None
  _, directory = candidates[0]
  return directory, dict(ocp.JsonCheckpointHandler().restore(epath.Path(directory) / 'meta'))


def restore_state_tree(state_dir: str) -> Any:
  """A saved `state` as a plain tree on this process's first device, whatever wrote it.

  Restoring without a target would place the arrays as they were sharded when saved, which fails
  under any other device topology ("Topology mismatch"): a teacher trained by several processes
  or on a pod slice would not load on one machine, nor one machine's on a pod slice.
  """
  checkpointer = ocp.StandardCheckpointer()
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local)
      if hasattr(m, 'shape') and hasattr(m, 'dtype')
      else m,
      ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree,
  )
  return checkpointer.restore(state_dir, target)


def restore_role(directory: str, role: str) -> dict:
  """One role's {'params': {...}, 'batch_stats': {...}} from a step directory's state."""
  restored = restore_state_tree(os.path.join(directory, 'state'))
  return restored['roles'][role]


def load_pretrained_role(
    path: str,
    model: str,
    num_classes: int,
    template_params: Any,
    template_stats: Any,
    role: str = '',
) -> tuple[Any, Any, dict]:
  """Backbone parameters and batch statistics of a trained model from another run's checkpoint.

  path: a workdir (its best checkpoint, else its latest), or a checkpoint step directory.
  role: which role of that run to take; '' takes 'model' (a CE run) or else 'teacher'.
  Raises ValueError naming both sides when the architecture or the shapes differ.
  """
  found = find_checkpoint(path)
  if found is None:
    raise ValueError(
        f"config.teacher.checkpoint='{path}' holds no checkpoint: expected a workdir of an "
        'earlier run (with best/ or checkpoints/) or a checkpoint step directory '
        '(with state/ and meta/). Train one with --config=configs/<teacher config>.py, or '
        'convert a PyTorch one with `python -m ffkd_jax.import_torch`.'
    )
  directory, meta = found
  saved_roles = meta.get('roles', {})
  chosen = role or ('model' if 'model' in saved_roles else 'teacher')
  if chosen not in saved_roles:
    raise ValueError(
        f"config.teacher.role='{chosen}' is not a role of the checkpoint at "
        f"'{directory}'; it has {sorted(saved_roles)}."
    )
  if saved_roles[chosen] != model or meta.get('num_classes', num_classes) != num_classes:
    raise ValueError(
        f"config.teacher.model='{model}' with {num_classes} classes does not match the "
        f"checkpoint at '{directory}': its role '{chosen}' is '{saved_roles[chosen]}' with "
        f"{meta.get('num_classes')} classes."
    )
  try:
    restored = restore_state_tree(os.path.join(directory, 'state'))
    check_digest(restored, meta, directory)
  except Exception as error:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
        f"config.teacher.checkpoint='{path}': the checkpoint at {directory} does not restore "
        f'intact ({_describe(error)}); point config.teacher.checkpoint '
        'at another step directory of that run (e.g. its checkpoints/<step>).'
    ) from error
  role_tree = restored['roles'][chosen]
  params, stats = role_tree['params']['backbone'], role_tree['batch_stats']['backbone']
  want = jax.tree.map(np.shape, (template_params, template_stats))
  got = jax.tree.map(np.shape, (params, stats))
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(
        f"config.teacher.checkpoint='{path}': parameter shapes of '{model}' do not "
        f"match the checkpoint's ({directory})."
    )
  logging.info(
      "Loaded teacher '%s' (role '%s', step %s) from %s.",
      model,
      chosen,
      meta.get('step', '?'),
      directory,
  )
  return params, stats, meta
