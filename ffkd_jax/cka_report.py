"""CKA pictures of any two checkpoints: the figures training draws at each evaluation.

  python -m ffkd_jax.cka_report --config configs/cifar10_folder.py:ffkd \
      --teacher /tmp/t20 --student /tmp/ffkd_r8 --out /tmp/cka_report [--num_examples 512]

--teacher and --student name a workdir (its best checkpoint, else its latest) or a checkpoint
step directory; the architectures and the class count come from the checkpoints' meta, the
images from the config's dataset (`--split`, default 'val': the split training evaluates on).
The report runs training's own diagnostics step (`ffkd_jax.step.make_diagnostics_step`) on the
fixed, class-mixed subset of the split that training's diagnostics use
(`ffkd_jax.evaluation.diagnostics_batch`), of `--num_examples` images (or `--num_batches` x
config.eval_batch_size), and draws with `ffkd_jax.cka_plots`, so its numbers are training's
numbers (for the same size):

  OUT/cka_matrix.png   linear CKA, every teacher stage x every student stage
  OUT/omega_hist.png   channel understanding omega per FFKD layer pair (config.ffkd.layer_pairs):
                       per teacher channel, CKA with the student's forward regressor output,
                       where the student's checkpoint has those regressors (an FFKD run)
  OUT/cka.json         the numbers drawn;  OUT/cka_report.json  what was compared, on what

Which role of each run: --teacher_role / --student_role; by default 'model' (a CE run) or else
'teacher' for --teacher, 'student' or else 'model' for --student.
"""

import dataclasses
import json
import logging as std_logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from ffkd_jax import checkpoint as checkpoint_lib
from ffkd_jax import cka_plots
from ffkd_jax import data
from ffkd_jax import evaluation
from ffkd_jax import parallel
from ffkd_jax import states as states_lib
from ffkd_jax import step as step_lib
from ffkd_jax.methods import ffkd as ffkd_lib
from ffkd_jax.methods import pairs

DEFAULT_NUM_EXAMPLES = 512
_DEFAULT_ROLES = {'teacher': ('model', 'teacher'), 'student': ('student', 'model')}


@dataclasses.dataclass(frozen=True)
class _Side:
  """One of the two checkpoints compared."""

  flag: str  # '--teacher' or '--student', for messages
  path: str
  directory: str
  role: str
  model: str
  meta: dict


def _locate(side: str, path: str, role: str) -> _Side:
  found = checkpoint_lib.find_checkpoint(path)
  if found is None:
    raise ValueError(
        f"--{side}='{path}' holds no checkpoint: give the workdir of a run (with "
        'best/ or checkpoints/) or a checkpoint step directory (with state/ and '
        'meta/).'
    )
  directory, meta = found
  roles = meta.get('roles', {})
  if not role:
    role = next((r for r in _DEFAULT_ROLES[side] if r in roles), '')
  if role not in roles:
    raise ValueError(
        f"--{side}_role='{role}' is not a role of the checkpoint at '{directory}'; "
        f'it has {sorted(roles)}: pick one with --{side}_role.'
    )
  return _Side(f'--{side}', path, directory, role, roles[role], meta)


def _shapes(tree: Any) -> Any:
  return jax.tree.map(np.shape, tree)


def _take(
    side: _Side, saved: dict, template: states_lib.RoleState, keys: tuple[str, ...]
) -> tuple[dict, dict]:
  """The role's params and batch stats under `keys` ('backbone', maybe 'heads'), shape-checked."""
  params, stats = {}, {}
  for key in keys:
    got = (saved['params'].get(key), saved['batch_stats'].get(key, {}))
    want = (template.params[key], template.batch_stats.get(key, {}))
    if got[0] is None or _shapes(got) != _shapes(want):
      raise ValueError(
          f"{side.flag}='{side.path}': the {key} parameters of role '{side.role}' "
          f"('{side.model}') in {side.directory} do not have the shapes this "
          'config builds.'
      )
    params[key], stats[key] = got
  return params, stats


def _has_matching_heads(saved: dict, template: states_lib.RoleState) -> bool:
  heads = saved['params'].get('heads')
  return heads is not None and _shapes(heads) == _shapes(template.params['heads'])


def run(
    config: ml_collections.ConfigDict,
    teacher: str,
    student: str,
    out_dir: str,
    *,
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    num_batches: int = 0,
    split: str = 'val',
    teacher_role: str = '',
    student_role: str = '',
) -> dict[str, Any]:
  """Computes the CKA diagnostics of two checkpoints and draws them into out_dir.

  Returns {'record': the diagnostics (cka_matrix, cka/<pair>, omega_channels/<pair>, ...),
  'teacher_layers', 'student_layers', 'num_examples', 'files': {name: path}}.
  """
  start = time.perf_counter()
  sides = {
      'teacher': _locate('teacher', teacher, teacher_role),
      'student': _locate('student', student, student_role),
  }
  source = data.open_source(config.dataset)
  info = source.info
  for side in sides.values():
    if side.meta.get('num_classes', info.num_classes) != info.num_classes:
      raise ValueError(
          f"{side.flag}='{side.path}' has {side.meta.get('num_classes')} classes; "
          f'the dataset of this config ({info.name}) has {info.num_classes}.'
      )

  # The FFKD method with the checkpoints' architectures gives the roles, the layer pairs and
  # the regressors; any other config.method is read as 'ffkd' with the same config.ffkd block.
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = sides['student'].model
  config.teacher.model = sides['teacher'].model
  if config.method not in ffkd_lib.PRESETS:
    config.method = 'ffkd'
  method, programs = states_lib.resolve(
      config, info.num_classes, info.image_size, lambda lr_scale: (optax.identity(), None)
  )
  state = states_lib.init_state(programs, info.image_size, config.seed)

  roles = dict(state.roles)
  for name, side in sides.items():
    template = roles[name]
    saved = checkpoint_lib.restore_role(side.directory, side.role)
    keys = ('backbone',)
    if programs[name].heads is not None:
      if _has_matching_heads(saved, template):
        keys += ('heads',)
      else:
        if name == 'student':  # omega reads the student's forward regressors only
          logging.info(
              "%s='%s' has no regressors for the layer pairs %s: no channel understanding "
              '(omega) is measured.',
              side.flag,
              side.path,
              method.layer_pairs,
          )
        programs[name] = dataclasses.replace(programs[name], heads=None)
    params, stats = _take(side, saved, template, keys)
    roles[name] = states_lib.RoleState(params, stats, ())

  requested = num_batches * config.eval_batch_size if num_batches > 0 else num_examples
  # The fixed, class-mixed subset training's diagnostics use (ffkd_jax/evaluation.py).
  batch = evaluation.diagnostics_batch(source, split, requested)
  n = len(batch['label']) * jax.process_count()
  mesh = parallel.make_mesh()
  state = parallel.replicate(mesh, state.replace(roles=roles))
  diagnostics_step = step_lib.make_diagnostics_step(method, programs, mesh)
  record = parallel.fetch(diagnostics_step(state, parallel.global_batch(mesh, batch)))

  teacher_layers = pairs.stage_names(method.feature_shapes['teacher'])
  student_layers = pairs.stage_names(method.feature_shapes['student'])
  files = {}
  if jax.process_index() == 0:
    t, s = sides['teacher'], sides['student']
    files = cka_plots.draw_figures(
        out_dir,
        record,
        teacher_layers,
        student_layers,
        title_note=(
            f'{n} {split} images; teacher step {t.meta.get("step", "?")}, '
            f'student step {s.meta.get("step", "?")}'
        ),
        teacher_label=f'teacher {t.model}',
        student_label=f'student {s.model}',
        layer_pairs=method.layer_pairs,
    )
    summary = {
        name: {
            'path': side.path,
            'checkpoint': side.directory,
            'role': side.role,
            'model': side.model,
            'step': side.meta.get('step'),
        }
        for name, side in sides.items()
    }
    summary.update(
        {
            'dataset': info.name,
            'split': split,
            'num_examples': n,
            'method': config.method,
            'layer_pairs': [list(p) for p in method.layer_pairs],
            'files': files,
            'scalars': {k: float(v) for k, v in record.items() if np.ndim(v) == 0},
        }
    )
    with open(os.path.join(out_dir, 'cka_report.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
  logging.info(
      'CKA report of %d %s images in %.1f s: %s',
      n,
      split,
      time.perf_counter() - start,
      ', '.join(sorted(files.values())),
  )
  return {
      'record': record,
      'teacher_layers': teacher_layers,
      'student_layers': student_layers,
      'num_examples': n,
      'files': files,
  }


def main(argv):
  # Flags live here so that importing the module (tests, notebooks) defines none.
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  # Orbax logs every restore at INFO; keep its warnings and errors only.
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname
  )
  run(
      flag_values.config,
      flag_values.teacher,
      flag_values.student,
      flag_values.out,
      num_examples=flag_values.num_examples,
      num_batches=flag_values.num_batches,
      split=flag_values.split,
      teacher_role=flag_values.teacher_role,
      student_role=flag_values.student_role,
  )


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      'config',
      None,
      'A config file (configs/*.py) naming the '
      'dataset and config.ffkd.layer_pairs; override fields with '
      '--config.<field>=<value>.',
      lock_config=True,
  )
  flags.DEFINE_string('teacher', None, 'Workdir or checkpoint step directory of the teacher.')
  flags.DEFINE_string('student', None, 'Workdir or checkpoint step directory of the student.')
  flags.DEFINE_string('out', None, 'Directory for the pictures and the numbers.')
  flags.DEFINE_integer(
      'num_examples',
      DEFAULT_NUM_EXAMPLES,
      'Images of the split in the one global batch CKA is computed on.',
  )
  flags.DEFINE_integer(
      'num_batches',
      0,
      '> 0: use this many config.eval_batch_size batches ' 'instead of --num_examples.',
  )
  flags.DEFINE_enum('split', 'val', list(data.EVAL_SPLITS), 'Which split to read.')
  flags.DEFINE_string('teacher_role', '', "Role of the teacher checkpoint ('': model or teacher).")
  flags.DEFINE_string('student_role', '', "Role of the student checkpoint ('': student or model).")
  for name in ('num_examples', 'num_batches', 'teacher_role', 'student_role'):
    flags.DEFINE_alias(name.replace('_', '-'), name)
  flags.mark_flags_as_required(['config', 'teacher', 'student', 'out'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  logging.set_verbosity(logging.INFO)
  app.run(main)
