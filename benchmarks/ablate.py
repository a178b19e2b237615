"""One-seed ablations of an FFKD preset beside an accuracy table: change `config.ffkd` fields.

  python benchmarks/ablate.py --preset cpu --out DIR NAME FIELD=VALUE [FIELD=VALUE ...]
      [--method ffkd] [--seed 0] [--data FOLDER]

DIR is an accuracy.py output folder: its teacher (DIR/teacher, trained by accuracy.py) is
distilled, with the run's config exactly as accuracy.py builds it for --method and --seed, then
the given fields of config.ffkd changed (values parsed as the field's type). The run goes into
DIR/ablate/NAME, resumes when run again, and is scored like a table's run (test top-1 at the best
validation evaluation); the result is printed as one JSON line and written to
DIR/ablate/NAME/result.json. `--epochs E` shortens the student's run to E epochs (the
learning-rate schedule fitted to them): the short sweep of docs/FFKD.md, judged on the validation
top-1 (`val_top1`, `teacher_val_top1`), never on test. For example:

  python benchmarks/ablate.py --preset cpu --out DIR --method fkd_cka --epochs 0.5 x100 cka_x100=True
  python benchmarks/ablate.py --preset cpu --out DIR --epochs 0.5 fb_late feedback_start_step=88
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from benchmarks import accuracy  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

FFKD_METHODS = ('ffkd', 'fkd', 'fkd_cka', 'fkd_fbkd')


def parse_value(field: str, text: str, current):
  """`text` as the type of the field's current value; a clear error otherwise."""
  try:
    if isinstance(current, bool):
      if text not in ('True', 'False', 'true', 'false', '1', '0'):
        raise ValueError(text)
      return text in ('True', 'true', '1')
    if isinstance(current, int):
      return int(float(text)) if float(text).is_integer() else int(text)
    if isinstance(current, float):
      return float(text)
    return type(current)(text)
  except ValueError:
    kind = {bool: 'True or False', int: 'an integer', float: 'a number'}.get(
        type(current), f'a {type(current).__name__}'
    )
    raise SystemExit(
        f'config.ffkd.{field}={text!r}: not {kind} (the field is {current!r} ' 'by default).'
    ) from None


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', choices=('cpu', 'tiny'), required=True)
  parser.add_argument('--out', required=True, help='the accuracy.py folder (its teacher).')
  parser.add_argument('--method', default='ffkd', choices=FFKD_METHODS)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
      '--epochs', type=float, default=0.0, help="the student's epochs (0: the preset's)."
  )
  parser.add_argument('--data', default=None, help='as accuracy.py --data.')
  parser.add_argument('name', help="the ablation's folder name under DIR/ablate/.")
  parser.add_argument('changes', nargs='+', metavar='FIELD=VALUE', help='config.ffkd fields.')
  args = parser.parse_args(argv)
  if args.preset == 'cpu':
    args.data = common.ensure_cifar10(args.data or common.DEFAULT_DATA)
  elif not args.data:
    parser.error('--preset tiny needs --data (a small image folder)')
  return args


def main(argv=None) -> int:
  args = parse_args(argv if argv is not None else sys.argv[1:])
  teacher = accuracy.preset_pairs(args.preset)[0]
  teacher_dir = os.path.join(args.out, 'teacher')
  if not accuracy.is_complete(teacher_dir):
    raise SystemExit(
        f'{teacher_dir}: no complete teacher run; run benchmarks/accuracy.py '
        f'--preset {args.preset} --out {args.out} first.'
    )
  config = accuracy.make_config(
      args.preset, args.method, teacher[0], teacher[1], args.seed, args.data, teacher_dir
  )
  if args.epochs > 0:
    config.num_epochs = args.epochs
    config.optimizer.warmup_epochs = 0.1 * args.epochs  # as accuracy.py sizes the cpu preset
    config.eval_every_steps = -1  # once an epoch, and at the end
  changes = {}
  for change in args.changes:
    field, sep, text = change.partition('=')
    if not sep or field not in config.ffkd:
      raise SystemExit(
          f'{change!r}: expected FIELD=VALUE with FIELD one of ' f'{sorted(config.ffkd.keys())}.'
      )
    changes[field] = config.ffkd[field] = parse_value(field, text, config.ffkd[field])
  workdir = os.path.join(args.out, 'ablate', args.name)
  accuracy.set_up_jax_and_logging(args.preset, args.out)
  accuracy.run_one(config, workdir, f'ablation {args.name}: {changes}')
  records = accuracy.read_records(workdir)
  result = {
      'name': args.name,
      'method': args.method,
      'seed': args.seed,
      'changes': changes,
      'ffkd': config.ffkd.to_dict(),  # the whole block the run used
      'epochs': config.num_epochs,
      'complete': accuracy.finished(records),
      **(accuracy.best_evaluation(records, 'student') or {}),
  }
  with open(os.path.join(workdir, 'result.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
