"""Where a train step's time goes: a jax.profiler trace of a few steps, summed by HLO op and by
what the op computes.

  python benchmarks/profile_step.py --configs ffkd,teacher_ce,student_ce \
      --teacher resnet56 --student resnet20 --out DIR

Each configuration is built as benchmarks/workers.py builds it (random data, batch 64, 32x32,
100 classes), AOT-compiled, warmed up, then traced for --steps steps. The trace's XLA CPU op
events (one per executed HLO instruction, named as in the compiled HLO) are mapped to the
`op_name` metadata of that instruction in `compiled.as_text()`, which records the JAX
transformation path, and summed into categories:

  model fwd / model bwd   jvp(CifarResNet)/... and transpose(jvp(CifarResNet))/... (any Flax
                          backbone class; teacher and student together)
  heads                   ConnectorHeads / RegressorHeads (FFKD's regressors), forward, backward
  cka (vmap)              ops under vmap() (e.g. cka.channel_cka's per-channel CKA; FFKD's stage
                          CKA is not vmapped and is counted under losses)
  losses                  other ops under jvp()/transpose(jvp()) of the objective
  finite check + keep     is_finite / reduce_and / select_n: the step's non-finite skip
  optimizer + update      the rest at the top level of the step (optax, parameter updates)
  collectives             all-gather / all-reduce (batch norm and CKA statistics)

Writes DIR/<config>.hlo.txt, DIR/<config>.trace/ (open with TensorBoard's profile plugin or
xprof), DIR/profile.json and DIR/profile.md; prints the markdown. Timings on a shared machine
are noisy; the shares within one step are the useful part.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import throughput  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import workers  # noqa: E402  pylint: disable=g-import-not-at-top

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"', re.M)
_WRAPPERS = ('ThunkExecutor', 'ThreadpoolListener', 'ParallelLoopRunner')


def op_names(hlo_text: str) -> dict[str, str]:
  return {name: op for name, op in _INSTRUCTION.findall(hlo_text)}


def category(op_name: str) -> str:
  if 'vmap(' in op_name:
    return 'cka (vmap)'
  if 'ConnectorHeads' in op_name or 'RegressorHeads' in op_name:
    return 'heads'
  backbone = re.search(r'(transpose\()?jvp\(([A-Z]\w*)\)', op_name)
  if backbone:
    return 'model bwd' if backbone.group(1) else 'model fwd'
  if re.search(r'all_gather|all-gather|psum|all_reduce', op_name):
    return 'collectives'
  if re.search(r'is_finite|reduce_and|select_n|_where', op_name):
    return 'finite check + keep'
  if 'jvp(' in op_name:
    return 'losses'
  if op_name:
    return 'optimizer + update'
  return 'unattributed'


def trace_ops(trace_dir: str) -> dict[str, float]:
  """Seconds per XLA op name summed over the trace's XLA CPU threads."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  space = xplane_pb2.XSpace()
  with open(sorted(files)[-1], 'rb') as f:
    space.ParseFromString(f.read())
  totals = collections.Counter()
  for plane in space.planes:
    if not plane.name.startswith('/host:CPU'):
      continue
    for line in plane.lines:
      if line.name == 'python' or 'PjRt' in line.name:
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if not name.startswith(_WRAPPERS):
          totals[name] += event.duration_ps / 1e12
  return totals


def profile(name: str, spec: dict, steps: int, out: str) -> dict:
  worker = workers.JaxWorker(spec)
  import jax  # pylint: disable=g-import-not-at-top

  hlo = worker.compiled.as_text()
  with open(os.path.join(out, f'{name}.hlo.txt'), 'w', encoding='utf-8') as f:
    f.write(hlo)
  names = op_names(hlo)
  trace_dir = os.path.join(out, f'{name}.trace')
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    step_times = worker.time('step', steps)
  wall = time.perf_counter() - start
  ops = trace_ops(trace_dir)
  by_category = collections.Counter()
  for op, seconds in ops.items():
    by_category[category(names.get(op, ''))] += seconds / steps
  top = [
      {'op': op, 's_per_step': s / steps, 'op_name': names.get(op, '')}
      for op, s in ops.most_common(15)
  ]
  return {
      'config': name,
      'step_s': step_times,
      'traced_wall_s': wall,
      'op_s_per_step': sum(ops.values()) / steps,
      'categories': dict(by_category),
      'top_ops': top,
      'flops': worker.ready.get('flops'),
      'load_average': common.load_average(),
  }


def markdown(results: list[dict], header: str) -> str:
  categories = sorted({c for r in results for c in r['categories']})
  lines = [
      header,
      '',
      '| category | ' + ' | '.join(r['config'] for r in results) + ' |',
      '| --- |' + ' --- |' * len(results),
  ]
  for c in categories:
    cells = []
    for r in results:
      seconds = r['categories'].get(c, 0.0)
      cells.append(f'{seconds * 1e3:.1f} ms ({100 * seconds / r["op_s_per_step"]:.1f}%)')
    lines.append(f'| {c} | ' + ' | '.join(cells) + ' |')
  lines.append(
      '| all ops (summed over threads) | '
      + ' | '.join(f'{r["op_s_per_step"] * 1e3:.1f} ms' for r in results)
      + ' |'
  )
  lines.append(
      '| step wall (min) | '
      + ' | '.join(f'{min(r["step_s"]) * 1e3:.1f} ms' for r in results)
      + ' |'
  )
  for r in results:
    lines += ['', f'Top ops of {r["config"]} (per step):', '']
    lines += [
        f'- {t["s_per_step"] * 1e3:.1f} ms `{t["op"]}` {t["op_name"][:110]}'
        for t in r['top_ops'][:8]
    ]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
      '--configs',
      default='ffkd,teacher_ce,student_ce',
      help='comma-separated: teacher_ce, student_ce, kd, fkd_cka, ffkd.',
  )
  parser.add_argument('--teacher', default='resnet56')
  parser.add_argument('--student', default='resnet20')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--out', required=True)
  parser.add_argument('--conv-impl', default='auto', choices=('auto', 'xla', 'matmul'))
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for name in args.configs.split(','):
    spec = {
        'kind': 'jax',
        'batch': args.batch,
        'image_size': 32,
        'num_classes': 100,
        'warmup': 1,
        'config': throughput.method_config(
            name, args.teacher, args.student, args.batch, args.conv_impl, args.dtype
        ),
    }
    print(f'profiling {name} ...', file=sys.stderr, flush=True)
    results.append(profile(name, spec, args.steps, args.out))
  header = (
      f'# Step profile: {args.teacher} -> {args.student}, batch {args.batch}\n\n'
      f'- {common.now()}, `{common.command_line()}`\n'
      f'- load average {common.load_average()}; {common.cpu_model()}, '
      f'{common.core_count()} cores'
  )
  with open(os.path.join(args.out, 'profile.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  table = markdown(results, header)
  with open(os.path.join(args.out, 'profile.md'), 'w', encoding='utf-8') as f:
    f.write(table)
  print(table)
  return results


if __name__ == '__main__':
  main()
