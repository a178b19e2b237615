"""Training throughput of FFKD against its parts, PyTorch and the input pipeline.

  python benchmarks/throughput.py --out results/throughput.json [--quick]

For each teacher -> student pair (resnet32x4 -> resnet8x4 and resnet56 -> resnet20; batch 64,
32x32 images, 100 classes) one worker process per configuration (benchmarks/workers.py, so
compile caches and memory never leak between configurations) builds and AOT-compiles its step:

  teacher_ce   CE train step of the teacher   student_ce   CE train step of the student
  teacher_fwd  one inference pass (eval step)  student_fwd  the same for the student
  kd           KD from a frozen teacher      fkd_cka     FFKD, teacher frozen (preset fkd_cka)
  ffkd         FFKD with feedback (preset ffkd: the student's phase, then the teacher's on a
               second batch), and FFKD's CKA part alone (see below)
  ffkd_no_cka  (full mode) the ffkd step with the stage CKA replaced by a constant
  torch_ffkd   the same FFKD step in PyTorch (benchmarks/torch_reference.py; eager, on CUDA when
               torch sees a GPU, else on the CPU with --threads threads; on the same
               allocator as the JAX workers, ffkd_jax/host_memory.py)
  input        ffkd_jax.data.train_iterator on the CIFAR-10 image folder (cache on)

All workers of a pair stay alive, idle, while the coordinator times them in alternation: each
round runs every worker for about --round-seconds in a rotating order, so that every ratio below
is taken between measurements of the same round and a noisy, shared machine shifts both sides.
Each figure is given as the median over rounds of the within-round value, and (`fastest`) from
the fastest step each configuration ran: interference only adds time, so on a loaded machine the
second is the less biased. The FLOP ratios from XLA's cost analysis, which no load changes, are
given beside them.

  sum_of_parts_ratio  ffkd step time / its floor, teacher_ce + student_ce + teacher_fwd +
                      student_fwd: each phase trains one network and reads the other in
                      inference mode, so no FFKD step can cost less than that sum
  cka_fraction        time of FFKD's CKA part alone / ffkd step time. The CKA part is a jitted
                      function of just what CKA adds, on the step's real feature shapes and
                      global batch: per stage pair the linear CKA of the raw maps, once per
                      phase (workers.py). In full mode `cka_fraction_ab` cross-checks it:
                      1 - ffkd_no_cka time / ffkd time.
  torch_ratio         JAX ffkd images/s / PyTorch ffkd images/s
  input_ratio         images/s the input pipeline delivers alone / ffkd images/s

Top-level figures are the worst over pairs (highest sum_of_parts_ratio and cka_fraction, lowest
torch_ratio and input_ratio); `ffkd_images_per_s` is the first pair's; `pairs` has everything.
Compile time is `lower` + `compile` of the AOT step; FLOPs are XLA's cost analysis of the same
step traced with XLA's own convolutions (`conv_impl='xla'`, lowered, not compiled: the analysis
cannot see into the custom calls of our CPU kernels); peak memory is the worker's max RSS (getrusage) and the device's memory_stats where the
backend has them (not on CPU).

Modes: default (every configuration, 5 rounds of ~8 s per worker, 2 warm-up steps, workers set
up one at a time); --quick (only what the headline figures need: the floor's four, ffkd,
torch_ffkd, input; 2 rounds of one step, 1 warm-up step, two workers set up at once, so their
compile times overlap; --configs adds others); --tiny (resnet8 -> resnet8 at 16x16, batch 8,
XLA optimisations off: a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # the configs import TensorFlow

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top
from ffkd_jax import host_memory  # noqa: E402  pylint: disable=g-import-not-at-top

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'workers.py')
PAIRS = (('resnet32x4', 'resnet8x4'), ('resnet56', 'resnet20'))
TARGETS = {
    'sum_of_parts_ratio': ('<=', 1.15),
    'cka_fraction': ('<', 0.05),
    'input_ratio': ('>=', 5.0),
    'torch_ratio': ('>=', 1.0),
}
JAX_CONFIGS = (
    'teacher_ce',
    'student_ce',
    'teacher_fwd',
    'student_fwd',
    'kd',
    'fkd_cka',
    'ffkd',
    'ffkd_no_cka',
)
FLOOR = ('teacher_ce', 'student_ce', 'teacher_fwd', 'student_fwd')
ALL_CONFIGS = JAX_CONFIGS + ('torch_ffkd', 'input')
HEADLINE_CONFIGS = FLOOR + ('ffkd', 'torch_ffkd', 'input')
MODES = {  # rounds, seconds each worker runs per round, warm-up steps, workers set up at once
    'full': dict(rounds=5, round_seconds=8.0, warmup=2, jobs=1, configs=ALL_CONFIGS),
    'quick': dict(rounds=2, round_seconds=0.0, warmup=1, jobs=2, configs=HEADLINE_CONFIGS),
    'tiny': dict(rounds=1, round_seconds=0.0, warmup=1, jobs=2, configs=ALL_CONFIGS),
}


class Worker:
  """A worker process and its JSON-lines pipe."""

  def __init__(self, name: str, spec: dict, log_dir: str):
    self.name, self.spec = name, spec
    self.log_path = os.path.join(log_dir, f'{name}.log')
    self.ready = None
    self.process = None

  def start(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1')
    # Every worker, PyTorch's too, on the allocator `python -m ffkd_jax.main` would start with
    # (FFKD_JAX_MALLOC, ffkd_jax/host_memory.py): both sides of a ratio run on the same one.
    env = host_memory.for_new_process(env)
    with open(self.log_path, 'w', encoding='utf-8') as log:
      self.process = subprocess.Popen(
          [sys.executable, WORKER, json.dumps(self.spec)],
          stdin=subprocess.PIPE,
          stdout=subprocess.PIPE,
          stderr=log,
          text=True,
          bufsize=1,
          env=env,
      )
    self.started = time.perf_counter()
    return self

  def _receive(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(
          f'worker {self.name} exited (code {self.process.wait()}); '
          f'log {self.log_path}:\n{self._log_tail()}'
      )
    message = json.loads(line)
    if 'error' in message:
      raise RuntimeError(f'worker {self.name} failed:\n{message["error"]}')
    return message

  def _log_tail(self, lines: int = 30) -> str:
    with open(self.log_path, encoding='utf-8', errors='replace') as f:
      return ''.join(f.readlines()[-lines:])

  def wait_ready(self) -> dict:
    if self.ready is None:
      self.ready = self._receive()['ready']
      self.ready['setup_s'] = time.perf_counter() - self.started
    return self.ready

  def request(self, command: dict) -> dict:
    self.process.stdin.write(json.dumps(command) + '\n')
    self.process.stdin.flush()
    return self._receive()

  def time(self, what: str, count: int) -> tuple[float, float]:
    """(mean, min) seconds per step (or per batch) over `count`."""
    seconds = self.request({'cmd': 'time', 'what': what, 'count': count})['seconds']
    per_item = [t * len(seconds) / count for t in seconds]  # input: one total for all batches
    return sum(seconds) / count, min(per_item)

  def quit(self) -> dict:
    final = self.request({'cmd': 'quit'})['final']
    self.process.wait(timeout=60)
    return final

  def kill(self):
    if self.process is not None and self.process.poll() is None:
      self.process.kill()
      self.process.wait()


def start_all(workers: list[Worker], jobs: int) -> None:
  """Starts and sets up the workers, at most `jobs` setting up at once, in order."""
  running = []
  for worker in workers:
    if len(running) >= jobs:
      running.pop(0).wait_ready()
    running.append(worker.start())
    print(f'  setting up {worker.name} ...', file=sys.stderr, flush=True)
  for worker in running:
    worker.wait_ready()


# ------------------------------------------------------------------------------------ configs


def method_config(
    method: str, teacher: str, student: str, batch: int, conv_impl='auto', dtype='float32'
) -> dict:
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.conv_impl = conv_impl
  config.dtype = dtype
  config.method = method
  config.model = teacher if method in ('teacher_ce', 'teacher_fwd') else student
  if method in FLOOR:
    config.method = 'ce'
  config.teacher.model = teacher
  config.batch_size = batch
  return config.to_dict()


def torch_spec(
    teacher, student, ffkd_config: dict, layer_pairs, shape: dict, warmup: int, threads: int
) -> dict:
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top

  from ffkd_jax.methods import ffkd as ffkd_method  # pylint: disable=g-import-not-at-top

  switches = dataclasses.asdict(ffkd_method.switches_for(ffkd_config['method']))
  terms = {
      f.name: switches[f.name] if f.name in switches else ffkd_config['ffkd'][f.name]
      for f in dataclasses.fields(torch_reference.Terms)
  }
  opt = ffkd_config['optimizer']
  return {
      'kind': 'torch',
      'teacher': teacher,
      'student': student,
      **shape,
      'layer_pairs': layer_pairs,
      'terms': terms,
      'warmup': warmup,
      'threads': threads,
      'optimizer': {
          'learning_rate': opt['learning_rate'],
          'momentum': opt['momentum'],
          'weight_decay': opt['weight_decay'],
          'teacher_lr_scale': ffkd_config['ffkd']['teacher_lr_scale'],
      },
  }


def count_for(seconds_per_step: float, round_seconds: float, minimum: int = 1) -> int:
  if round_seconds <= 0 or seconds_per_step <= 0:
    return minimum
  return max(minimum, min(1000, round(round_seconds / seconds_per_step)))


# ---------------------------------------------------------------------------------- one pair


def run_pair(teacher, student, args, mode, log_dir, input_worker) -> dict:
  shape = {'batch': args.batch, 'image_size': args.image_size, 'num_classes': args.num_classes}
  base = {'kind': 'jax', **shape, 'warmup': mode['warmup'], 'fast_compile': args.tiny}
  names = [n for n in JAX_CONFIGS if n in args.configs]
  if 'ffkd' not in names:
    raise ValueError(
        f'--configs={",".join(args.configs)}: ffkd is needed (every ratio is ' 'taken against it).'
    )
  jax_workers = {}
  for name in names:
    method = {'ffkd_no_cka': 'ffkd'}.get(name, name)
    spec = dict(
        base,
        config=method_config(method, teacher, student, args.batch, args.conv_impl, args.dtype),
    )
    if name == 'ffkd':
      spec['cka'] = True
    if name == 'ffkd_no_cka':
      spec['variant'] = 'no_cka'
    if name in ('teacher_fwd', 'student_fwd'):
      spec['variant'] = 'forward'
    jax_workers[name] = Worker(f'{teacher}-{student}.{name}', spec, log_dir)
  workers = dict(jax_workers)
  try:
    start_all(list(jax_workers.values()), mode['jobs'])
    ffkd_ready = jax_workers['ffkd'].ready
    if 'torch_ffkd' in args.configs:
      spec = torch_spec(
          teacher,
          student,
          jax_workers['ffkd'].spec['config'],
          ffkd_ready['layer_pairs'],
          shape,
          mode['warmup'],
          args.threads,
      )
      workers['torch_ffkd'] = Worker(f'{teacher}-{student}.torch_ffkd', spec, log_dir)
      start_all([workers['torch_ffkd']], 1)
    if input_worker is not None:
      workers['input'] = input_worker

    counts = {}
    for name, worker in workers.items():
      warm = worker.ready['warmup_s'][-1] / (args.input_warmup if name == 'input' else 1)
      counts[name] = count_for(warm, mode['round_seconds'], 20 if name == 'input' else 1)
    cka_warm = ffkd_ready['cka']['warmup_s']
    counts['cka'] = count_for(cka_warm, max(mode['round_seconds'], 0.5), 3)

    rounds, best = [], {}
    order = list(workers)
    for r in range(mode['rounds']):
      rotated = order[r % len(order) :] + order[: r % len(order)]
      record = {'load_average': common.load_average()}
      for name in rotated:
        timed = [(name, 'input' if name == 'input' else 'step')]
        if name == 'ffkd':
          timed.append(('cka', 'cka'))
        for key, what in timed:
          record[key], fastest = workers[name].time(what, counts[key])
          best[key] = min(best.get(key, fastest), fastest)
      rounds.append(record)
      print(
          f'  round {r + 1}/{mode["rounds"]}: '
          + ', '.join(f'{k}={v * 1e3:.1f}ms' for k, v in record.items() if k != 'load_average')
          + f' | load {record["load_average"]}',
          file=sys.stderr,
          flush=True,
      )
    finals = {name: w.quit() for name, w in workers.items() if name != 'input'}
  finally:
    for name, worker in workers.items():
      if name != 'input':
        worker.kill()
  return summarize_pair(teacher, student, args, workers, finals, rounds, best, counts)


def _median(values):
  return statistics.median(values) if values else None


def summarize_pair(teacher, student, args, workers, finals, rounds, best, counts) -> dict:
  """Per config: the median over rounds of each round's mean step time (`seconds_per_step`)
  and the fastest single step seen (`fastest_step_s`). Ratios: the median over rounds of the
  ratio within each round (`ratios`), and the same ratio of the fastest steps
  (`ratios_fastest`: interference only ever adds time, so on a loaded machine this one is the
  less biased of the two)."""
  configs = {}
  for name, worker in workers.items():
    per_round = [r[name] for r in rounds]
    seconds = _median(per_round)
    ready = dict(worker.ready)
    entry = {
        'seconds_per_step': seconds,
        'per_round_s': per_round,
        'fastest_step_s': best[name],
        'steps_per_round': counts[name],
    }
    if name == 'input':
      entry['images_per_s'] = ready['image_shape'][0] / seconds
      entry.update(
          {k: ready[k] for k in ('cache_fill_s', 'image_shape', 'num_train', 'rss_after_cache_mb')}
      )
    else:
      entry['images_per_s'] = args.batch / seconds
      entry.update({k: v for k, v in ready.items() if k not in ('device',)})
      entry.update(finals.get(name, {}))
      if ready.get('flops'):
        entry['gflop_per_step'] = ready['flops'] / 1e9
        entry['achieved_gflop_per_s'] = ready['flops'] / 1e9 / seconds
    configs[name] = entry
  if 'ffkd' in configs:
    cka = configs['ffkd']['cka']
    cka['per_round_s'] = [r['cka'] for r in rounds]
    cka['seconds'] = _median(cka['per_round_s'])
    cka['fastest_s'] = best['cka']
    cka['runs_per_round'] = counts['cka']

  def ratio(numerator, denominator):
    values = [numerator(r) / denominator(r) for r in rounds]
    return {
        'median': _median(values),
        'per_round': values,
        'fastest': numerator(best) / denominator(best),
    }

  ratios = {'cka_fraction': ratio(lambda r: r['cka'], lambda r: r['ffkd'])}
  if all(name in configs for name in FLOOR):
    ratios['sum_of_parts_ratio'] = ratio(
        lambda r: r['ffkd'], lambda r: sum(r[name] for name in FLOOR)
    )
  if 'ffkd_no_cka' in configs:
    ratios['cka_fraction_ab'] = ratio(lambda r: r['ffkd'] - r['ffkd_no_cka'], lambda r: r['ffkd'])
  if 'torch_ffkd' in configs:
    ratios['torch_ratio'] = ratio(lambda r: r['torch_ffkd'], lambda r: r['ffkd'])
  if 'input' in configs:
    batch_ratio = configs['input']['image_shape'][0] / args.batch
    ratios['input_ratio'] = ratio(lambda r: r['ffkd'] * batch_ratio, lambda r: r['input'])
  flops = {name: c.get('flops') for name, c in configs.items()}
  flop_ratio = None
  if all(flops.get(n) for n in ('ffkd',) + FLOOR):
    flop_ratio = flops['ffkd'] / sum(flops[name] for name in FLOOR)
  return {
      'teacher': teacher,
      'student': student,
      'device': workers['ffkd'].ready['device'],
      'configs': configs,
      'ratios': {k: v['median'] for k, v in ratios.items()},
      'ratios_fastest': {k: v['fastest'] for k, v in ratios.items()},
      'ratios_per_round': {k: v['per_round'] for k, v in ratios.items()},
      'flop_sum_of_parts_ratio': flop_ratio,
      'cka_flop_fraction': (
          (configs['ffkd']['cka'].get('flops') or 0) / flops['ffkd'] if flops.get('ffkd') else None
      ),
      'rounds': rounds,
  }


# ------------------------------------------------------------------------------------ report


RATIO_KEYS = ('sum_of_parts_ratio', 'cka_fraction', 'cka_fraction_ab', 'torch_ratio', 'input_ratio')
_WORST = {
    'sum_of_parts_ratio': max,
    'cka_fraction': max,
    'cka_fraction_ab': max,
    'torch_ratio': min,
    'input_ratio': min,
}


def headline(pairs: list[dict], source: str = 'ratios') -> dict:
  """The worst value over pairs of each ratio (from `ratios` or `ratios_fastest`)."""
  result = {}
  for key in RATIO_KEYS:
    values = [p[source][key] for p in pairs if p[source].get(key) is not None]
    result[key] = _WORST[key](values) if values else None
  return result


def meets(result: dict) -> dict:
  ops = {'<=': lambda a, b: a <= b, '<': lambda a, b: a < b, '>=': lambda a, b: a >= b}
  return {
      k: (None if result.get(k) is None else ops[op](result[k], bound))
      for k, (op, bound) in TARGETS.items()
  }


def _fmt(value, digits=1):
  if value is None:
    return '-'
  return f'{value:.{digits}f}'


def markdown(result: dict) -> str:
  lines = [
      f'# Throughput ({result["mode"]} mode)',
      '',
      f'- date: {result["date"]}',
      f'- command: `{result["command"]}`',
      f'- device: {result["device"]["description"]}',
      f'- load average (1, 5, 15 min): start {result["load_average"]["start"]}, '
      f'end {result["load_average"]["end"]}; wall {result["wall_s"]:.0f} s, '
      f'CPU {result["cpu_s"]:.0f} s (all processes)',
      f'- batch {result["batch"]}, {result["image_size"]}x{result["image_size"]}, '
      f'{result["num_classes"]} classes, {result.get("dtype", "float32")}, convolutions '
      f'{result.get("conv_description") or result.get("conv_impl", "xla")}; '
      f'{result["rounds"]} rounds; PyTorch\'s worker: '
      f'{result.get("torch_host_memory") or "not run"}. "median": median over '
      'rounds of the within-round ratio; "fastest": ratio of the fastest steps seen.',
      '',
      '| figure (worst pair) | median | fastest | target | met (median) |',
      '| --- | --- | --- | --- | --- |',
      f'| ffkd_images_per_s ({result["pairs"][0]["teacher"]} -> '
      f'{result["pairs"][0]["student"]}) | {_fmt(result["ffkd_images_per_s"], 2)} | '
      f'{_fmt(result["fastest"]["ffkd_images_per_s"], 2)} | | |',
  ]
  for key in RATIO_KEYS:
    target = TARGETS.get(key)
    met = result['meets'].get(key)
    lines.append(
        f'| {key} | {_fmt(result.get(key), 3)} | {_fmt(result["fastest"].get(key), 3)}'
        f' | {f"{target[0]} {target[1]}" if target else ""} | '
        f'{"" if met is None else ("yes" if met else "NO")} |'
    )
  for pair in result['pairs']:
    lines += [
        '',
        f'## {pair["teacher"]} -> {pair["student"]}',
        '',
        '| config | images/s | step ms (median) | step ms (fastest) | compile s | '
        'GFLOP/step | GFLOP/s | peak RSS MB | peak device MB |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for name, c in pair['configs'].items():
      stats = c.get('device_memory_stats') or {}
      device_peak = stats.get('peak_bytes_in_use')
      lines.append(
          f'| {name} | {_fmt(c["images_per_s"])} | {_fmt(c["seconds_per_step"] * 1e3)}'
          f' | {_fmt(c["fastest_step_s"] * 1e3)}'
          f' | {_fmt(c.get("compile_s"))} | {_fmt(c.get("gflop_per_step"), 2)} | '
          f'{_fmt(c.get("achieved_gflop_per_s"), 2)} | {_fmt(c.get("rss_peak_mb"), 0)} | '
          f'{_fmt(device_peak / 2**20 if device_peak else None, 0)} |'
      )
    cka = pair['configs']['ffkd']['cka']
    lines.append(
        f'| ffkd: CKA part alone | | {_fmt(cka["seconds"] * 1e3, 2)} | '
        f'{_fmt(cka["fastest_s"] * 1e3, 2)} | {_fmt(cka["compile_s"])} | '
        f'{_fmt((cka.get("flops") or 0) / 1e9, 3)} | | | |'
    )
    lines += [
        '',
        'ratios (median / fastest): '
        + ', '.join(
            f'{k} {_fmt(v, 3)} / {_fmt(pair["ratios_fastest"][k], 3)}'
            for k, v in pair['ratios'].items()
        ),
        f'FLOP ratios: sum of parts {_fmt(pair["flop_sum_of_parts_ratio"], 3)}, CKA '
        f'{_fmt(pair["cka_flop_fraction"], 4)}',
    ]
  return '\n'.join(lines) + '\n'


# -------------------------------------------------------------------------------------- main


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='JSON file to write (markdown beside it).')
  parser.add_argument('--quick', action='store_true', help='fewer, shorter rounds (< 5 min).')
  parser.add_argument('--tiny', action='store_true', help='smoke-test mode: tiny models.')
  parser.add_argument(
      '--data',
      default=common.DEFAULT_DATA,
      help='CIFAR-10 image folder for the input pipeline (unpacked if missing).',
  )
  parser.add_argument(
      '--pairs',
      default=None,
      help='teacher:student,... (default resnet32x4:resnet8x4,resnet56:resnet20)',
  )
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument('--round-seconds', type=float, default=None)
  parser.add_argument('--jobs', type=int, default=None, help='workers set up at once.')
  parser.add_argument(
      '--threads',
      type=int,
      default=common.core_count(),
      help='PyTorch threads (default: the cores this process may use).',
  )
  parser.add_argument(
      '--configs',
      default=None,
      help=f'comma-separated subset of {",".join(ALL_CONFIGS)} (default: all; '
      f'--quick: {",".join(HEADLINE_CONFIGS)}).',
  )
  parser.add_argument('--log-dir', default=None, help='worker logs (default: a temp folder).')
  parser.add_argument(
      '--conv-impl',
      default='auto',
      choices=('auto', 'xla', 'matmul'),
      help='config.conv_impl of the JAX steps (ffkd_jax/models/conv.py).',
  )
  parser.add_argument(
      '--dtype',
      default='float32',
      choices=('float32', 'bfloat16'),
      help='config.dtype of the JAX steps (activations; parameters stay float32).',
  )
  args = parser.parse_args(argv)
  mode_name = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
  mode = dict(MODES[mode_name])
  args.configs = mode['configs'] if args.configs is None else tuple(args.configs.split(','))
  mode['configs'] = args.configs
  unknown = set(args.configs) - set(ALL_CONFIGS)
  if unknown:
    parser.error(f'--configs: {sorted(unknown)} not in {ALL_CONFIGS}')
  for key in ('rounds', 'round_seconds', 'jobs'):
    if getattr(args, key) is not None:
      mode[key] = getattr(args, key)
  if args.pairs:
    pairs = [tuple(p.split(':')) for p in args.pairs.split(',')]
  else:
    pairs = [('resnet8', 'resnet8')] if args.tiny else list(PAIRS)
  args.batch, args.image_size, args.num_classes = (8, 16, 10) if args.tiny else (64, 32, 100)
  args.input_warmup = 20
  return args, mode_name, mode, pairs


def main(argv=None) -> dict:
  args, mode_name, mode, pairs = parse_args(argv if argv is not None else sys.argv[1:])
  started = time.perf_counter()
  load_start = common.load_average()
  log_dir = args.log_dir or tempfile.mkdtemp(prefix='ffkd-throughput-')
  os.makedirs(log_dir, exist_ok=True)
  print(f'mode {mode_name}: {mode}; worker logs in {log_dir}', file=sys.stderr, flush=True)
  input_worker = None
  results = []
  try:
    if 'input' in args.configs:
      path = common.ensure_cifar10(args.data) if not args.tiny else args.data
      input_worker = Worker(
          'input',
          {'kind': 'input', 'path': path, 'batch': args.batch, 'warmup_batches': args.input_warmup},
          log_dir,
      )
      start_all([input_worker], 1)
    for teacher, student in pairs:
      print(f'{teacher} -> {student}', file=sys.stderr, flush=True)
      results.append(run_pair(teacher, student, args, mode, log_dir, input_worker))
    input_final = input_worker.quit() if input_worker is not None else None
  finally:
    if input_worker is not None:
      input_worker.kill()

  device = common.describe_machine(results[0]['device'])
  result = {
      'command': common.command_line(),
      'date': common.now(),
      'mode': mode_name,
      'settings': mode,
      'batch': args.batch,
      'image_size': args.image_size,
      'num_classes': args.num_classes,
      'conv_impl': args.conv_impl,
      'conv_description': results[0]['device'].get('conv_description'),
      'dtype': args.dtype,
      'rounds': mode['rounds'],
      'device': device,
      'load_average': {'start': load_start, 'end': common.load_average()},
      'torch_threads': args.threads,
      'torch_host_memory': results[0]['configs']
      .get('torch_ffkd', {})
      .get('torch', {})
      .get('host_memory'),
      'ffkd_images_per_s': results[0]['configs']['ffkd']['images_per_s'],
      **headline(results),
      'fastest': {
          'ffkd_images_per_s': args.batch / results[0]['configs']['ffkd']['fastest_step_s'],
          **headline(results, 'ratios_fastest'),
      },
      'targets': {k: f'{op} {b}' for k, (op, b) in TARGETS.items()},
      'pairs': results,
      'input_final': input_final,
      'wall_s': time.perf_counter() - started,
      'cpu_s': _cpu_seconds(),
      'worker_logs': log_dir,
  }
  result['meets'] = meets(result)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  table = markdown(result)
  with open(os.path.splitext(args.out)[0] + '.md', 'w', encoding='utf-8') as f:
    f.write(table)
  print(table)
  return result


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished workers: a figure that,
  unlike the wall time, a busy machine does not inflate much."""
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    usage = resource.getrusage(who)
    total += usage.ru_utime + usage.ru_stime
  return total


if __name__ == '__main__':
  main()
