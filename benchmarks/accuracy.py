"""Accuracy table: a teacher, then every student method for N seeds, selected by validation.

  python benchmarks/accuracy.py --preset cpu --seeds 3 --out DIR [--methods ce,kd,ffkd]

Trains the teacher once with CE (DIR/teacher), then each method of METHODS for seeds 0..N-1
(DIR/<method>/seed<k>), every run through `ffkd_jax.train.train_and_evaluate`, so the script is
resumable: run the same command again after it is killed and completed runs (a `final/` record in
their metrics.jsonl) are skipped while partial runs resume from their latest checkpoint. A preset
with several teacher -> student pairs nests that layout under DIR/<teacher>-<student>/.

Selection: the train split minus a fixed validation carve-out (config.dataset.val_fraction =
0.1) trains; each evaluation scores the validation split (eval/top1, which also picks the run's
best checkpoint) and the test split (test/<role>_top1). A run's result is the test top-1 of the
evaluation with the highest validation top-1 (the first of equals, as the best checkpoint is
kept), for the student and, where the run has one, the teacher (frozen methods: the loaded CE
teacher; feedback methods: the co-trained teacher). Over seeds: mean +- sample std.
Writes DIR/results.json, DIR/results.md (table with date, machine, command) and DIR/results.png.

Presets:
  cifar100  the standard protocol (configs/cifar100_distill.py: 240 epochs, batch 64, SGD 0.05,
            decay at 150/180/210) for resnet32x4 -> resnet8x4 and wrn_40_2 -> wrn_16_2, teachers
            from configs/cifar100_teacher.py, TFDS cifar100 (--data: a TFDS data_dir). For a GPU
            or TPU machine: 2 x (1 + len(METHODS) x seeds) runs of 240 epochs.
  cpu       CIFAR-10 JPEG folder (--data), resnet20 -> resnet8, batch 128, cosine lr 0.1
            (configs/cifar10_folder.py); sized (below) when METHODS had 8 methods so that 3
            seeds took under 3 hours on a 2-core CPU; one seed of today's 22 took 1 h 29 min
            on 2 shared cores on 2026-12-01 (benchmarks/README.md), the teacher and 6 runs reused.
  tiny      resnet8 -> resnet8 for a few steps on any small image folder: a smoke test.

Sizing of `cpu` (`--estimate --assume-gflops 35` on 2026-11-23: 2-core AMD EPYC shared with other
jobs, load average ~5.8; FLOPs from XLA's cost analysis of each step at batch 128):
  45,000 train images (val_fraction 0.1) / batch 128 = 351 steps per epoch.
  GFLOP per step: teacher CE (resnet20) 29.4; students (resnet8): ce 9.1, kd 18.8, dist 18.8,
  rkd 20.0, fkd 18.8, fkd_cka 21.5, fkd_fbkd 43.1, ffkd 43.1 (sum 193.2).
  Rate 35 GFLOP/s: the best these steps reached on this host (the kd step here; the resnet56 ->
  resnet20 FFKD step at batch 64 at load ~3). Under load ~6 they ran at 14-25 GFLOP/s.
    teacher   3 epochs = 1,053 steps x 29.4 GFLOP / 35 GFLOP/s              =   885 s
    students  1 epoch  =   351 steps x 193.2 GFLOP / 35 GFLOP/s = 1,937 s x 3 = 5,812 s
    eval      2 per run (half-way, end): val 5,000 + test 10,000 images through every role,
              1/3 of a CE step per image, over the 25 runs                      = 1,944 s
    compile   train + eval + diagnostics steps, ~15 s a run                    =   360 s
    total                                                              ~9,000 s = 2.5 h < 3 h
  The same projection from the step times measured under that load gives 4.8 h (fastest steps)
  to 5.5 h (mean steps): run the table on an otherwise idle machine. On the idle machine (load
  average 0.5-1.4, 2026-11-23 10:37) `--estimate` measured 0.83 s per teacher step and 0.25 (ce)
  to 1.24 s (ffkd) per student step, and projects 2.14 h (mean steps) / 2.00 h (fastest).
  The table then took 1 h 46 min (benchmarks/results/acc-cpu-2026-11-23/timings.txt): the
  evaluations cost less than the 1/3-of-a-step-per-image guess.
  This sizing predates dkd, sp, ickd, cd, ccs, reviewkd, crd, dml, kdcl and sokd in METHODS
  (not measured here): with them the table takes longer; `--methods` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TensorFlow's INFO lines

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

METHODS = (
    'ce',
    'kd',
    'dkd',
    'dist',
    'rkd',
    'cc',
    'fitnet',
    'at',
    'sp',
    'ickd',
    'iekd',
    'cd',
    'ccs',
    'reviewkd',
    'crd',
    'dml',
    'kdcl',
    'sokd',
    'fkd',
    'fkd_cka',
    'fkd_fbkd',
    'ffkd',
)
VAL_FRACTION = 0.1

# cpu preset: a teacher of 5 epochs and students of 2, so that feedback has a trained teacher to
# refine and students long enough to profit (the FFKD table, README: ce, kd and the four FFKD
# presets at 2 seeds take about 2 hours on 2 idle cores; sizing in the module docstring).
TEACHER_EPOCHS = 5.0
STUDENT_EPOCHS = 2.0
EVALS_PER_RUN = 2


# ------------------------------------------------------------------------------------ presets


def preset_pairs(preset: str) -> list[tuple[str, str]]:
  return {
      'cifar100': [('resnet32x4', 'resnet8x4'), ('wrn_40_2', 'wrn_16_2')],
      'cpu': [('resnet20', 'resnet8')],
      'tiny': [('resnet8', 'resnet8')],
  }[preset]


def _cpu_base(method: str, data: str):
  from configs import cifar10_folder  # pylint: disable=g-import-not-at-top

  config = cifar10_folder.get_config(method)
  config.dataset.path = data
  config.dataset.val_fraction = VAL_FRACTION
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  return config


def _tiny_base(method: str, data: str):
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.method = method
  config.dataset.name = 'image_folder'
  config.dataset.path = data
  config.dataset.val_fraction = 0.25
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = 4
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 2
  config.keep_checkpoints = 1
  config.optimizer.schedule = 'constant'
  return config


def make_config(
    preset: str, method: str, teacher: str, student: str, seed: int, data, teacher_dir: str | None
):
  """The config of one run; method 'teacher' is the teacher's CE run."""
  is_teacher = method == 'teacher'
  if preset == 'cifar100':
    from configs import cifar100_distill, cifar100_teacher  # pylint: disable=g-import-not-at-top

    config = (
        cifar100_teacher.get_config(teacher)
        if is_teacher
        else cifar100_distill.get_config(f'{method},{teacher},{student}')
    )
    config.dataset.val_fraction = VAL_FRACTION
    if data:
      config.dataset.data_dir = data
  elif preset == 'cpu':
    config = _cpu_base('teacher' if is_teacher else method, data)
    config.num_epochs = TEACHER_EPOCHS if is_teacher else STUDENT_EPOCHS
    config.optimizer.warmup_epochs = 0.1 * config.num_epochs  # the config's 1 epoch is a run
  else:
    config = _tiny_base('ce' if is_teacher else method, data)
  config.model = teacher if is_teacher else student
  config.teacher.model = teacher
  config.seed = seed
  if preset == 'cpu':
    steps = _total_steps(config)
    config.eval_every_steps = max(1, math.ceil(steps / EVALS_PER_RUN))
    # Step counts sized for the 240-epoch protocol keep their share of the run: IE-KD's
    # auto-encoder 30 / 240 epochs before the student, DKD's and ReviewKD's warm-ups 20 / 240.
    config.iekd.ae_steps = max(1, round(steps * 30 / 240))
    config.dkd.warmup_steps = max(1, round(steps * 20 / 240))
    config.reviewkd.warmup_steps = max(1, round(steps * 20 / 240))
  if not is_teacher and method != 'ce':
    config.teacher.checkpoint = teacher_dir
  return config


def _total_steps(config) -> int:
  from ffkd_jax import data  # pylint: disable=g-import-not-at-top

  if config.num_train_steps > 0:
    return config.num_train_steps
  info = data.open_source(config.dataset).info
  return int(config.num_epochs * data.steps_per_epoch(info, config.batch_size))


# --------------------------------------------------------------------------------- the runs


def read_records(workdir: str) -> list[dict]:
  """The run's metrics.jsonl events ([] before it starts); a line torn by a kill is skipped."""
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return []
  from ffkd_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  return metrics_lib.read_metrics(workdir)


def finished(records: list[dict]) -> bool:
  """Whether a run's records end it (train_and_evaluate writes `final/*` at its end)."""
  return any('final/step' in r for r in records)


def is_complete(workdir: str) -> bool:
  return finished(read_records(workdir))


def best_evaluation(records: list[dict], primary_role: str) -> dict | None:
  """The evaluation record with the highest eval/top1 (the first of equals) and its test top-1.

  eval/top1 is the validation top-1 when the run has a validation split; the test figures are
  then `test/<role>_top1`. Without a validation split (eval is the test split) it falls back to
  `eval/<role>_top1` and says so.
  """
  evals = [r for r in records if 'eval/top1' in r]
  if not evals:
    return None
  best = max(evals, key=lambda r: r['eval/top1'])  # max keeps the first of equals
  has_val = any(k.startswith('test/') for k in best)
  prefix = 'test' if has_val else 'eval'
  result = {
      'step': best['step'],
      'epoch': best.get('epoch'),
      'val_top1': best['eval/top1'],
      'selected_by': 'val' if has_val else 'test (no validation split)',
      'test_top1': best.get(f'{prefix}/{primary_role}_top1'),  # the run's own model
      'teacher_test_top1': best.get(f'{prefix}/teacher_top1'),
      'teacher_val_top1': best.get('eval/teacher_top1') if has_val else None,
  }
  return result


_IDENTITY_FIELDS = ('method', 'model', 'seed', 'num_epochs', 'num_train_steps', 'batch_size')


def check_same_run(workdir: str, config) -> None:
  """Refuses to resume or reuse a run made with another config in the same folder."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  for field in _IDENTITY_FIELDS:
    if field in saved and saved[field] != config[field]:
      raise ValueError(
          f'{workdir} holds a run with {field}={saved[field]!r}, but this command '
          f'asks for {field}={config[field]!r}; pass another --out (or remove it).'
      )
  if saved.get('teacher', {}).get('model') not in (None, config.teacher.model):
    raise ValueError(
        f'{workdir} holds a run distilled from {saved["teacher"]["model"]}, not '
        f'{config.teacher.model}; pass another --out.'
    )


class Interrupted(Exception):
  pass


def run_one(config, workdir: str, label: str) -> str:
  """Trains (or resumes) one run unless it is complete; 'skipped' or 'trained'."""
  check_same_run(workdir, config)
  if is_complete(workdir):
    print(f'[done]  {label}: {workdir}', file=sys.stderr, flush=True)
    return 'skipped'
  from ffkd_jax import train  # pylint: disable=g-import-not-at-top

  resumed = os.path.isdir(os.path.join(workdir, 'checkpoints'))
  print(f'[{"resume" if resumed else "train"}] {label}: {workdir}', file=sys.stderr, flush=True)
  summary = train.train_and_evaluate(config, workdir)
  if 'preempted_at' in summary:
    raise Interrupted(f'{label} stopped at step {summary["preempted_at"]}')
  return 'trained'


def plan(args) -> list[dict]:
  """Every run of the table in order: per pair the teacher, then seed-major students."""
  pairs = preset_pairs(args.preset)
  runs = []
  for teacher, student in pairs:
    root = args.out if len(pairs) == 1 else os.path.join(args.out, f'{teacher}-{student}')
    teacher_dir = os.path.join(root, 'teacher')
    runs.append(
        {
            'pair': f'{teacher}->{student}',
            'method': 'teacher',
            'seed': 0,
            'teacher': teacher,
            'student': student,
            'workdir': teacher_dir,
            'teacher_dir': None,
        }
    )
    for seed in range(args.seeds):
      for method in args.methods:
        runs.append(
            {
                'pair': f'{teacher}->{student}',
                'method': method,
                'seed': seed,
                'teacher': teacher,
                'student': student,
                'workdir': os.path.join(root, method, f'seed{seed}'),
                'teacher_dir': teacher_dir,
            }
        )
  return runs


def config_of(args, run):
  return make_config(
      args.preset,
      run['method'],
      run['teacher'],
      run['student'],
      run['seed'],
      args.data,
      run['teacher_dir'],
  )


# ---------------------------------------------------------------------------------- results


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  # One seed has no spread: None (shown without ±), never a 0.00 that reads as "no variance".
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def primary_role(method: str) -> str:
  """The role whose accuracy is a run's result: 'model' (CE), 'peer0' (online), 'student'."""
  if method in ('teacher', 'ce'):
    return 'model'
  from ffkd_jax import methods  # pylint: disable=g-import-not-at-top

  return methods.method_class(_MethodName(method)).primary_role


class _MethodName:
  """The one field `methods.method_class` reads."""

  def __init__(self, method: str):
    self.method = method


def collect(runs: list[dict]) -> dict:
  """Per pair: the teacher's result and, per method, every seed's and their mean +- std."""
  pairs = {}
  for run in runs:
    pair = pairs.setdefault(run['pair'], {'teacher': None, 'methods': {}})
    role = primary_role(run['method'])
    records = read_records(run['workdir'])
    best = best_evaluation(records, role)
    entry = {
        'seed': run['seed'],
        'workdir': run['workdir'],
        'complete': finished(records),
        **(best or {}),
    }
    if records:
      entry['wall_s'] = records[-1]['time'] - records[0]['time']
    if run['method'] == 'teacher':
      pair['teacher'] = entry
      continue
    method = pair['methods'].setdefault(run['method'], {'seeds': []})
    method['seeds'].append(entry)
  for pair in pairs.values():
    for method in pair['methods'].values():
      done = [s for s in method['seeds'] if s['complete']]
      method['student_test_top1'] = [s['test_top1'] for s in done if s.get('test_top1') is not None]
      method['student_mean'], method['student_std'] = _mean_std(method['student_test_top1'])
      method['teacher_mean'], method['teacher_std'] = _mean_std(
          [s.get('teacher_test_top1') for s in done]
      )
      method['val_mean'], _ = _mean_std([s.get('val_top1') for s in done])
      method['seeds_done'] = len(done)
  return pairs


def difference(values: list[float], baseline: list[float]):
  """Mean of `values` minus mean of `baseline`, with the standard error of that difference
  (Welch: sqrt(s1^2/n1 + s2^2/n2), sample variances); (None, None) with under 2 seeds on a side."""
  if len(values) < 2 or len(baseline) < 2:
    return None, None
  delta = statistics.mean(values) - statistics.mean(baseline)
  return delta, math.sqrt(
      statistics.variance(values) / len(values) + statistics.variance(baseline) / len(baseline)
  )


def _delta_cell(method: dict, baseline: dict | None) -> str:
  delta, error = difference(
      method['student_test_top1'], baseline['student_test_top1'] if baseline else []
  )
  return '-' if delta is None else f'{delta:+.2f} ± {error:.2f}'


def _pct(value):
  return '-' if value is None else f'{value:.2f}'


def _pm(mean, std):
  if mean is None:
    return '-'
  return f'{mean:.2f}' if std is None else f'{mean:.2f} ± {std:.2f}'


def write_markdown(path: str, header: dict, pairs: dict) -> None:
  lines = [
      f'# Accuracy: preset `{header["preset"]}`',
      '',
      f'- date: {header["date"]} (first invocation: {header.get("started", "-")})',
      f'- command: `{header["command"]}`',
      f'- machine: {header["machine"]}',
      f'- seeds: {header["seeds"]}; selection: test '
      'top-1 at the evaluation with the best validation top-1; mean ± sample std over '
      'completed seeds; Δ: difference of the student means, ± its standard error '
      '(Welch)',
      '',
  ]
  for name, pair in pairs.items():
    teacher = pair['teacher'] or {}
    lines += [
        f'## {name}',
        '',
        f'Teacher (CE): test top-1 {_pct(teacher.get("test_top1"))} '
        f'(val {_pct(teacher.get("val_top1"))}, '
        f'{"complete" if teacher.get("complete") else "incomplete"}).',
        '',
        '| method | student test top-1 | teacher test top-1 | student val top-1 | seeds '
        '| per seed (student) | Δ vs ce | Δ vs kd |',
        '| --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for method, m in pair['methods'].items():
      per_seed = ', '.join(
          '-'
          if s.get('test_top1') is None
          else f'{s["test_top1"]:.2f}{"" if s["complete"] else "*"}'
          for s in m['seeds']
      )
      val = '-' if m['val_mean'] is None else f'{m["val_mean"]:.2f}'
      teacher_cell = '-' if method == 'ce' else _pm(m['teacher_mean'], m['teacher_std'])
      lines.append(
          f'| {method} | {_pm(m["student_mean"], m["student_std"])} | {teacher_cell} | '
          f'{val} | {m["seeds_done"]}/{len(m["seeds"])} | {per_seed} | '
          f'{_delta_cell(m, pair["methods"].get("ce")) if method != "ce" else "-"} | '
          f'{_delta_cell(m, pair["methods"].get("kd")) if method != "kd" else "-"} |'
      )
    lines.append('')
  if any(
      not s['complete']
      for pair in pairs.values()
      for m in pair['methods'].values()
      for s in m['seeds']
  ):
    lines.append('`*`: run not complete (left out of the mean).')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def write_plot(path: str, pairs: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  most = max((len(pair['methods']) for pair in pairs.values()), default=1)
  width = max(7.0, 0.45 * most + 2)  # room for every method's label
  fig, axes = plt.subplots(1, len(pairs), figsize=(width * len(pairs), 4.5), squeeze=False)
  for ax, (name, pair) in zip(axes[0], pairs.items()):
    methods = list(pair['methods'])
    xs = range(len(methods))

    def column(key, missing=math.nan):
      return [
          pair['methods'][m][key] if pair['methods'][m][key] is not None else missing
          for m in methods
      ]

    ax.bar(
        [x - 0.2 for x in xs],
        column('student_mean'),
        0.4,
        yerr=column('student_std', 0.0),
        capsize=3,
        label='student',
    )
    ax.bar(
        [x + 0.2 for x in xs],
        column('teacher_mean'),
        0.4,
        yerr=column('teacher_std', 0.0),
        capsize=3,
        label='teacher',
    )
    teacher_ce = (pair['teacher'] or {}).get('test_top1')
    if teacher_ce is not None:
      ax.axhline(teacher_ce, color='grey', linestyle='--', label='teacher (CE)')
    finite = [v for v in column('student_mean') + column('teacher_mean') if not math.isnan(v)]
    if finite:
      low = min(finite + ([teacher_ce] if teacher_ce is not None else []))
      ax.set_ylim(max(0.0, low - 5.0), None)
    ax.set_xticks(list(xs), methods, rotation=45, ha='right')
    ax.set_ylabel('test top-1 (%)')
    ax.set_title(name)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return common.describe_machine(
      {
          'platform': device.platform,
          'device_kind': device.device_kind,
          'device_count': jax.device_count(),
      }
  )


def report(args, runs, started: str) -> dict:
  """Writes DIR/results.{json,md,png}; `started` stays the first invocation's over resumptions."""
  pairs = collect(runs)
  previous = os.path.join(args.out, 'results.json')
  if os.path.exists(previous):
    try:
      with open(previous, encoding='utf-8') as f:
        started = min(started, json.load(f).get('started') or started)
    except (OSError, ValueError):
      pass  # a damaged or foreign file: this invocation's start it is
  host = machine()
  header = {
      'preset': args.preset,
      'seeds': args.seeds,
      'methods': list(args.methods),
      'date': common.now(),
      'started': started,
      'command': common.command_line(),
      'machine': host['description'],
      'load_average': common.load_average(),
  }
  result = {**header, 'machine_details': host, 'pairs': pairs}
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  write_markdown(os.path.join(args.out, 'results.md'), header, pairs)
  write_plot(os.path.join(args.out, 'results.png'), pairs)
  return result


# ------------------------------------------------------------------------------------ estimate


def estimate(args, runs) -> dict:
  """Times each distinct run's train step (one worker process each, benchmarks/workers.py) and
  projects the table's wall time: steps x step time + evaluations + a compile per run.

  Three projections: with the mean step time measured now, with the fastest step seen (a loaded
  machine only adds time), and, with --assume-gflops R, with every step and evaluation costing
  XLA's FLOP count / R. Evaluations: every role's forward pass over val + test, a third of a CE
  train step per image (the forward pass of forward + backward).
  """
  from benchmarks import throughput  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  log_dir = tempfile.mkdtemp(prefix='ffkd-estimate-')
  from ffkd_jax import data  # pylint: disable=g-import-not-at-top

  per_kind = {}
  for run in runs:
    key = (run['pair'], run['method'])
    if key in per_kind:
      continue
    config = config_of(args, run)
    info = data.open_source(config.dataset).info
    spec = {
        'kind': 'jax',
        'batch': config.batch_size,
        'image_size': info.image_size,
        'num_classes': info.num_classes,
        'warmup': 2,
        'config': config.to_dict(),
        'fast_compile': args.preset == 'tiny',
    }
    worker = throughput.Worker(f'{run["method"]}', spec, log_dir).start()
    try:
      ready = worker.wait_ready()
      mean_s, fastest_s = worker.time('step', 3)  # after 2 warm-up steps
      worker.quit()
    finally:
      worker.kill()
    steps = _total_steps(config)
    evals = math.ceil(steps / config.eval_every_steps) if config.eval_every_steps > 0 else 1
    per_kind[key] = {
        'mean_step_s': mean_s,
        'fastest_step_s': min(fastest_s, *ready['warmup_s'][1:]),
        'flops': ready.get('flops'),
        'steps': steps,
        'evals': evals,
        'compile_s': ready['lower_s'] + ready['compile_s'],
        'eval_images': info.num_val + info.num_test,
        'batch': config.batch_size,
        'load_average': common.load_average(),
    }
    print(
        f'  {key}: {mean_s:.3f} s/step (fastest {fastest_s:.3f}) x {steps} steps, '
        f'{(ready.get("flops") or 0) / 1e9:.1f} GFLOP/step, compile '
        f'{per_kind[key]["compile_s"]:.0f} s | load {common.load_average()}',
        file=sys.stderr,
        flush=True,
    )
  step_costs = {
      'measured_mean': lambda k: k['mean_step_s'],
      'measured_fastest': lambda k: k['fastest_step_s'],
  }
  if args.assume_gflops:
    step_costs[f'at_{args.assume_gflops:g}_gflops'] = lambda k: k['flops'] / (
        args.assume_gflops * 1e9
    )
  projections = {name: project(per_kind, runs, cost) for name, cost in step_costs.items()}
  result = {
      'per_method': {f'{p}:{m}': v for (p, m), v in per_kind.items()},
      'projections': projections,
      'load_average': common.load_average(),
      'date': common.now(),
      'command': common.command_line(),
      'settings': {
          'teacher_epochs': TEACHER_EPOCHS,
          'student_epochs': STUDENT_EPOCHS,
          'evals_per_run': EVALS_PER_RUN,
      },
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'estimate.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  for name, p in projections.items():
    print(
        f'{name:24s} {p["total_h"]:.2f} h  (train {p["train_s"] / 3600:.2f} h, eval '
        f'{p["eval_s"] / 3600:.2f} h, compile {p["compile_s"] / 3600:.2f} h) '
        f'for {len(runs)} runs'
    )
  print(f'load average now {common.load_average()}')
  return result


def project(per_kind: dict, runs: list[dict], step_cost) -> dict:
  """Projected seconds of `runs` with step_cost(kind) seconds per train step."""
  ce_image_s = {}  # seconds per image of a CE train step, by model
  for (pair, method), k in per_kind.items():
    if method in ('teacher', 'ce'):
      model = pair.split('->')[0] if method == 'teacher' else pair.split('->')[1]
      ce_image_s[model] = step_cost(k) / k['batch']
  totals = {'train_s': 0.0, 'eval_s': 0.0, 'compile_s': 0.0}
  for run in runs:
    k = per_kind[(run['pair'], run['method'])]
    models = (
        [run['teacher']]
        if run['method'] == 'teacher'
        else ([run['student']] if run['method'] == 'ce' else [run['teacher'], run['student']])
    )
    totals['train_s'] += k['steps'] * step_cost(k)
    totals['eval_s'] += (
        k['evals'] * k['eval_images'] * sum(ce_image_s.get(m, 0.0) for m in models) / 3
    )
    totals['compile_s'] += k['compile_s']
  total = sum(totals.values())
  return {**totals, 'total_s': total, 'total_h': total / 3600}


# ---------------------------------------------------------------------------------------- main


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', choices=('cpu', 'cifar100', 'tiny'), required=True)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--out', required=True, help='folder of the runs and the results.')
  parser.add_argument(
      '--methods', default=','.join(METHODS), help=f'comma-separated subset of {",".join(METHODS)}.'
  )
  parser.add_argument(
      '--data',
      default=None,
      help=f'cpu/tiny: the image folder (cpu default {common.DEFAULT_DATA}, '
      'unpacked from ../shared/data if missing); cifar100: a TFDS data_dir.',
  )
  parser.add_argument(
      '--dry-run', action='store_true', help='print the runs and their state, train nothing.'
  )
  parser.add_argument(
      '--estimate',
      action='store_true',
      help="time every run kind's step and project the wall time; train nothing.",
  )
  parser.add_argument(
      '--assume-gflops',
      type=float,
      default=None,
      help='--estimate: also project with every step at this GFLOP/s.',
  )
  parser.add_argument(
      '--no-compile-cache',
      action='store_true',
      help='do not keep compiled steps in DIR/.jax_cache (shared by the seeds).',
  )
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    parser.error(f'--methods: {unknown} not in {list(METHODS)}')
  if args.seeds < 1:
    parser.error('--seeds must be >= 1')
  if args.preset == 'cpu':
    args.data = common.ensure_cifar10(args.data or common.DEFAULT_DATA)
  elif args.preset == 'tiny' and not args.data:
    parser.error('--preset tiny needs --data (a small image folder)')
  return args


def set_up_jax_and_logging(preset: str, out: str, compile_cache: bool = True) -> None:
  """Training progress at INFO (as the CLI), and compiled steps cached in OUT/.jax_cache."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  # As ffkd_jax.main: orbax logs every save at INFO; keep its warnings and errors only.
  logging.get_absl_handler().python_handler.addFilter(
      lambda record: record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname
  )
  if preset == 'tiny':
    jax.config.update('jax_disable_most_optimizations', True)
  if compile_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.join(out, '.jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  os.makedirs(out, exist_ok=True)


def main(argv=None) -> int:
  args = parse_args(argv if argv is not None else sys.argv[1:])
  started = common.now()
  runs = plan(args)
  from ffkd_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top

  missing = [m for m in args.methods if m not in methods_lib.available_methods()]
  if missing:
    raise SystemExit(
        f'methods {missing} are not registered in ffkd_jax.methods '
        f'(available: {methods_lib.available_methods()}).'
    )
  if args.dry_run:
    for run in runs:
      state = (
          'complete'
          if is_complete(run['workdir'])
          else 'partial'
          if os.path.isdir(os.path.join(run['workdir'], 'checkpoints'))
          else 'new'
      )
      config = config_of(args, run)
      teacher = '-' if run['method'] in ('teacher', 'ce') else config.teacher.model
      print(
          f'{run["pair"]:24s} {run["method"]:9s} seed {run["seed"]}  {state:8s} '
          f'{config.model} <- {teacher}  steps {_total_steps(config)}  {run["workdir"]}'
      )
    return 0
  if args.estimate:
    estimate(args, runs)
    return 0

  set_up_jax_and_logging(args.preset, args.out, compile_cache=not args.no_compile_cache)
  status = 0
  try:
    for index, run in enumerate(runs, start=1):
      label = f'({index}/{len(runs)}) {run["pair"]} {run["method"]} seed {run["seed"]}'
      start = time.perf_counter()
      outcome = run_one(config_of(args, run), run['workdir'], label)
      if outcome == 'trained':
        print(f'        {label}: {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
        report(args, runs, started)  # partial tables as runs complete
  except (Interrupted, KeyboardInterrupt) as stop:
    print(f'Stopped ({stop or "interrupt"}); run the same command to resume.', file=sys.stderr)
    status = 130
  result = report(args, runs, started)
  print(open(os.path.join(args.out, 'results.md'), encoding='utf-8').read())
  del result
  return status


if __name__ == '__main__':
  sys.exit(main())
