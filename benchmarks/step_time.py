"""Times one jitted train step in this process: for comparing XLA flags and config.conv_impl.

  XLA_FLAGS=... python benchmarks/step_time.py --conv-impl auto --teacher resnet56 \\
      --student resnet20 [--method ffkd] [--dtype float32]

Builds the step as benchmarks/workers.py does (random data, batch 64, 32x32, 100 classes, one
device), AOT-compiles the program of step 0, runs one warm-up step and then --steps timed steps,
and prints one line: compile seconds, the minimum and median step in ms, XLA's GFLOPs (of the
step traced with XLA's own convolutions: its cost analysis cannot see into custom calls), the
minor page faults a timed step costs (memory mapped afresh and touched), and the process's CPU
seconds per second of the timed steps ("cores busy"; spinning threads count as busy). Run as a
script it first restarts itself with the allocator FFKD_JAX_MALLOC asks for (tcmalloc where
installed, by default), as `python -m ffkd_jax.main` does (ffkd_jax/host_memory.py). Unlike
throughput.py it runs one configuration in one process, so a flag set in XLA_FLAGS applies to
exactly what is timed; compare lines of one host and one sitting only.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--conv-impl', default='auto', choices=('auto', 'xla', 'matmul'))
  parser.add_argument('--teacher', default='resnet56')
  parser.add_argument('--student', default='resnet20')
  parser.add_argument('--method', default='ffkd', help="a method, or 'teacher_ce'/'student_ce'")
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--hlo', help='also write the compiled program (optimised HLO) here')
  args = parser.parse_args(argv)
  from ffkd_jax import host_memory  # pylint: disable=g-import-not-at-top

  if argv is None:  # run as a script: as `python -m ffkd_jax.main` does
    host_memory.restart_with_allocator()
  from ffkd_jax.models import conv  # pylint: disable=g-import-not-at-top

  conv.configure(args.conv_impl)  # before JAX starts its backend
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import throughput  # pylint: disable=g-import-not-at-top
  from ffkd_jax import optim, parallel  # pylint: disable=g-import-not-at-top
  from ffkd_jax import states as states_lib  # pylint: disable=g-import-not-at-top
  from ffkd_jax import step as step_lib  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      throughput.method_config(
          args.method, args.teacher, args.student, args.batch, args.conv_impl, args.dtype
      )
  )

  def make_optimizer(lr_scale):
    schedule = optim.learning_rate_schedule(config.optimizer, 781, 1000, scale=lr_scale)
    return optim.make_optimizer(config.optimizer), schedule

  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[args.dtype]
  method, programs = states_lib.resolve(config, 100, args.image_size, make_optimizer, dtype=dtype)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = states_lib.init_state(
      programs, args.image_size, 0, method, common.synthetic_train_labels(100)
  )
  state = parallel.replicate(mesh, state)
  batch = parallel.global_batch(
      mesh, common.random_step_batch(method, args.batch, args.image_size, 100)
  )
  start = time.perf_counter()
  compiled = step_lib.make_train_step(method, programs, mesh).jitted(0).lower(state, batch)
  compiled = compiled.compile()
  compile_s = time.perf_counter() - start
  if args.hlo:
    with open(args.hlo, 'w', encoding='utf-8') as f:
      f.write(compiled.as_text())
  with conv.using('xla'):  # XLA's cost analysis cannot see inside our kernels' custom calls
    lowered = step_lib.make_train_step(method, programs, mesh).jitted(0).lower(state, batch)
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
      analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get('flops', float('nan'))
  state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  usage = resource.getrusage(resource.RUSAGE_SELF)
  faults, cpu_s = usage.ru_minflt, usage.ru_utime + usage.ru_stime
  for _ in range(args.steps):
    start = time.perf_counter()
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  faults = (usage.ru_minflt - faults) / args.steps
  busy = (usage.ru_utime + usage.ru_stime - cpu_s) / sum(times)
  result = {
      'conv': conv.describe(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compile_s': compile_s,
      'min_ms': 1e3 * min(times),
      'median_ms': 1e3 * statistics.median(times),
      'gflop': flops / 1e9,
      'page_faults_per_step': faults,
      'cores_busy': busy,
  }
  print(
      f'{args.method} {args.teacher} -> {args.student} {args.dtype}, {result["conv"]}, '
      f'XLA_FLAGS={result["xla_flags"]!r}: compile {compile_s:.1f} s, step min '
      f'{result["min_ms"]:.0f} ms, median {result["median_ms"]:.0f} ms, '
      f'{result["gflop"]:.2f} GFLOP, {faults:.0f} page faults a step, {busy:.2f} cores busy'
  )
  return result


if __name__ == '__main__':
  main()
