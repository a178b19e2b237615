"""Benchmark workers: one process per configuration, driven by throughput.py over pipes.

  python benchmarks/workers.py '<spec JSON>'

The worker sets itself up (builds, compiles, warms up), writes one JSON line `{"ready": ...}` to
stdout, then answers one JSON line per command read from stdin:
  {"cmd": "time", "what": "step" | "cka" | "input", "count": k} -> {"seconds": [...], "count": k}
    (the seconds of each step, each waited for; the input worker gives one total for k batches)
  {"cmd": "quit"} -> {"final": {...}} and exits.
Anything else the process prints goes to stderr (the coordinator's log file). A worker waits on
stdin between commands without using the CPU, so the coordinator can keep several alive and time
them in alternation (rounds) on a noisy machine.

Kinds:
  jax    `make_train_step` of one method (ffkd_jax.step), AOT-compiled; optionally also a jitted
         function of just FFKD's per-pair channel CKA, channel weights and the feedback term's
         gradient on the step's real feature shapes (`cka`), and a variant of the step with the
         CKA replaced by a constant (`variant: "no_cka"`).
  torch  benchmarks/torch_reference.py's FFKD step.
  input  ffkd_jax.data.train_iterator on an image folder (cache on).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ------------------------------------------------------------------------------------------ jax


def synthetic_state(programs, image_size: int, seed: int, method=None, num_classes: int = 100):
  """A TrainState of the right structure with He-scaled random parameters, built on the host;
  the method's own state (CRD's memory) as `method.init_state` makes it for
  `common.synthetic_train_labels(num_classes)`.

  Flax's own `init` runs every layer op by op (or compiles a second program), which costs tens
  of seconds on a CPU for the larger ResNets; step time does not depend on the values as long as
  they are finite and of a realistic scale, so the benchmark draws them here instead.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ffkd_jax import states as states_lib  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: states_lib.init_state(programs, image_size, seed))
  rng = np.random.default_rng(seed)

  def key_name(entry) -> str:
    return str(getattr(entry, 'key', getattr(entry, 'name', getattr(entry, 'idx', ''))))

  def fill(path, leaf):
    names = [key_name(p) for p in path]
    dtype = np.dtype(leaf.dtype)
    if not np.issubdtype(dtype, np.floating) or 'opt_state' in names:
      return np.zeros(leaf.shape, dtype)  # steps, momentum traces
    last = names[-1]
    if 'batch_stats' in names:
      return (np.ones if last == 'var' else np.zeros)(leaf.shape, dtype)
    if last == 'scale':
      return np.ones(leaf.shape, dtype)
    if last == 'bias':
      return np.zeros(leaf.shape, dtype)
    if last == 'kernel' and len(leaf.shape) == 4:  # (kh, kw, in, out): kaiming normal, fan-out
      kh, kw, _, out = leaf.shape
      return rng.normal(0.0, math.sqrt(2.0 / (kh * kw * out)), leaf.shape).astype(dtype)
    fan_in = leaf.shape[0] if leaf.shape else 1
    return rng.uniform(-1, 1, leaf.shape).astype(dtype) / math.sqrt(max(fan_in, 1))

  state = jax.tree_util.tree_map_with_path(fill, shapes.replace(method_state={}))
  if method is not None:
    from benchmarks import common  # pylint: disable=g-import-not-at-top

    state = state.replace(
        method_state=method.init_state(common.synthetic_train_labels(num_classes))
    )
  return state


def _cost(compiled) -> dict:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {
      'flops': float(analysis.get('flops', 0.0)) or None,
      'bytes_accessed': float(analysis.get('bytes accessed', 0.0)) or None,
  }


def _patch_out_cka():
  """Replaces FFKD's stage CKA by a constant: the step minus the CKA computation."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ffkd_jax.methods import ffkd as ffkd_module  # pylint: disable=g-import-not-at-top

  ffkd_module.stage_cka = lambda u, v, x100, unbiased: jnp.float32(0.5)


class JaxWorker:
  """One method's train step on random data of the configured shape."""

  def __init__(self, spec):
    import jax  # pylint: disable=g-import-not-at-top

    if spec.get('fast_compile'):
      jax.config.update('jax_disable_most_optimizations', True)
    import ml_collections  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from ffkd_jax import optim, parallel  # pylint: disable=g-import-not-at-top
    from ffkd_jax import states as states_lib  # pylint: disable=g-import-not-at-top
    from ffkd_jax import step as step_lib  # pylint: disable=g-import-not-at-top

    self.jax = jax
    if spec.get('variant') == 'no_cka':
      _patch_out_cka()
    config = ml_collections.ConfigDict(spec['config'])
    from ffkd_jax.models import conv  # pylint: disable=g-import-not-at-top

    conv.configure(config.get('conv_impl', 'auto'))  # before JAX starts its backend
    batch_size, image_size, num_classes = spec['batch'], spec['image_size'], spec['num_classes']
    steps_per_epoch = 50_000 // batch_size

    def make_optimizer(lr_scale):
      schedule = optim.learning_rate_schedule(
          config.optimizer,
          steps_per_epoch,
          int(config.num_epochs * steps_per_epoch),
          scale=lr_scale,
      )
      return optim.make_optimizer(config.optimizer), schedule

    method, programs = states_lib.resolve(config, num_classes, image_size, make_optimizer)
    feature_shapes = method.feature_shapes
    mesh = parallel.make_mesh()
    state = parallel.replicate(
        mesh, synthetic_state(programs, image_size, config.seed, method, num_classes)
    )
    from benchmarks import common  # pylint: disable=g-import-not-at-top

    # Every stream the method's phases read (FFKD's feedback phase: a second one).
    host_batch = common.random_step_batch(method, batch_size, image_size, num_classes)
    self.forward_only = spec.get('variant') == 'forward'
    if self.forward_only:  # one inference pass of every role (the eval step), no update
      host_batch['mask'] = np.ones((batch_size,), np.float32)

    def make_program():
      if self.forward_only:
        return step_lib.make_eval_step(programs, mesh)
      # Step 0's program (the benchmarked configs update every trainable role from step 0).
      return step_lib.make_train_step(method, programs, mesh).jitted(0)

    program = make_program()
    self.batch = parallel.global_batch(mesh, host_batch)

    start = time.perf_counter()
    lowered = program.lower(state, self.batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    self.state = state
    # XLA's cost analysis cannot see inside our CPU kernels' custom calls: the FLOPs are those of
    # the same step traced with XLA's own convolutions, before optimisation (not compiled).
    with conv.using('xla'):
      self.cost = _cost(make_program().lower(state, self.batch))
    rss_after_compile = peak_rss_mb()
    warmup = self._time_steps(max(1, spec.get('warmup', 1)))

    device = jax.devices()[0]
    self.ready = {
        'lower_s': lower_s,
        'compile_s': compile_s,
        **self.cost,
        'warmup_s': warmup,
        'rss_after_compile_mb': rss_after_compile,
        # The last warm-up step's losses: finite, and no update skipped (nonfinite = 0).
        'warmup_metrics': {
            k: float(v)
            for k, v in self.metrics.items()
            if k == 'nonfinite' or k.startswith('loss/')
        },
        'params': {
            name: states_lib.count_params(role.params) for name, role in self.state.roles.items()
        },
        'trainable_roles': [n for n, p in programs.items() if p.optimizer is not None],
        'layer_pairs': [list(p) for p in getattr(method, 'layer_pairs', ())],
        'device': {
            'platform': device.platform,
            'device_kind': device.device_kind,
            'device_count': jax.device_count(),
            'jax': jax.__version__,
            'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'conv_impl': conv.implementation(),
            'conv_description': conv.describe(),
        },
    }
    if spec.get('cka'):
      self.ready.update(self._setup_cka(method, feature_shapes, batch_size))

  def _time_steps(self, count: int) -> list[float]:
    """Seconds of each of `count` steps, each waited for (so a step's time is its own)."""
    times = []
    for _ in range(count):
      start = time.perf_counter()
      if self.forward_only:
        self.metrics = {'nonfinite': 0.0}
        self.jax.block_until_ready(self.compiled(self.state, self.batch))
      else:
        self.state, self.metrics = self.compiled(self.state, self.batch)
        self.jax.block_until_ready(self.state)
      times.append(time.perf_counter() - start)
    return times

  def _setup_cka(self, method, feature_shapes, batch_size) -> dict:
    """Jits FFKD's CKA part alone on the step's shapes: per stage pair, CKA_k of the raw teacher
    and student maps on the global batch, once per phase (forward, and feedback where the preset
    has it), no gradient (the maps are stop-gradient). On several devices each computes this on
    the whole gathered batch, so one device running it on the global batch is the per-device
    cost (the all_gather not included)."""
    jax, jnp = self.jax, self.jax.numpy
    import numpy as np  # pylint: disable=g-import-not-at-top
    from ffkd_jax import cka  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(1)
    shapes = [
        (
            (batch_size,) + tuple(feature_shapes['teacher'][t].shape[1:]),
            (batch_size,) + tuple(feature_shapes['student'][s].shape[1:]),
        )
        for t, s in method.layer_pairs
    ]
    us = [jnp.asarray(np.abs(rng.normal(size=t)).astype(np.float32)) for t, _ in shapes]
    vs = [jnp.asarray(np.abs(rng.normal(size=s)).astype(np.float32)) for _, s in shapes]
    phases = len(method.phases())

    def stage_ckas(us, vs):
      return [
          jnp.stack([cka.layer_cka(u + k, v) for u, v in zip(us, vs)]) for k in range(phases)
      ]  # (the + k keeps XLA from merging the phases' identical computations)

    start = time.perf_counter()
    self.cka_fn = jax.jit(stage_ckas).lower(us, vs).compile()
    compile_s = time.perf_counter() - start
    self.cka_args = (us, vs)
    warm = min(self._time_cka(3))
    return {
        'cka': {
            'compile_s': compile_s,
            **_cost(self.cka_fn),
            'warmup_s': warm,
            'phases': phases,
            'shapes': shapes,
        }
    }

  def _time_cka(self, count: int) -> list[float]:
    times = []
    for _ in range(count):
      start = time.perf_counter()
      self.jax.block_until_ready(self.cka_fn(*self.cka_args))
      times.append(time.perf_counter() - start)
    return times

  def time(self, what: str, count: int) -> list[float]:
    return self._time_cka(count) if what == 'cka' else self._time_steps(count)

  def final(self) -> dict:
    stats = None
    try:
      stats = self.jax.devices()[0].memory_stats()
    except Exception:  # pylint: disable=broad-except; not every backend has it
      pass
    return {'rss_peak_mb': peak_rss_mb(), 'device_memory_stats': stats}


# ---------------------------------------------------------------------------------------- torch


class TorchWorker:
  """benchmarks/torch_reference.py's FFKD step on random data."""

  def __init__(self, spec):
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
    from ffkd_jax import host_memory  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    self.torch = torch
    device = 'cuda' if torch.cuda.is_available() else 'cpu'  # the accelerator JAX would use
    batch_size, image_size = spec['batch'], spec['image_size']
    self.step = torch_reference.FFKDStep(
        spec['teacher'],
        spec['student'],
        spec['num_classes'],
        image_size,
        spec['layer_pairs'],
        torch_reference.Terms(**spec['terms']),
        **spec['optimizer'],
        device=device,
    )
    shape = (batch_size, 3, image_size, image_size)
    self.batches = [  # the forward phase's batch and the feedback phase's
        (
            torch.randn(*shape, device=device),
            torch.randint(0, spec['num_classes'], (batch_size,), device=device),
        )
        for _ in range(2)
    ]
    warmup = self.time('step', spec.get('warmup', 1))
    self.ready = {
        'warmup_s': warmup,
        'params': {
            'teacher': torch_reference.count_parameters(self.step.teacher),
            'student': torch_reference.count_parameters(self.step.student),
            'regressors': torch_reference.count_parameters(self.step.regressors),
        },
        'torch': {
            'version': torch.__version__,
            'threads': torch.get_num_threads(),
            'device': device,
            'mkldnn': torch.backends.mkldnn.is_available(),
            'host_memory': host_memory.describe(),
        },
    }

  def time(self, what: str, count: int) -> list[float]:
    del what
    times = []
    for _ in range(count):
      start = time.perf_counter()
      self.step.step(*self.batches[0], *self.batches[1])  # waits: returns the losses as floats
      times.append(time.perf_counter() - start)
    return times

  def final(self) -> dict:
    result = {'rss_peak_mb': peak_rss_mb()}
    if self.torch.cuda.is_available():
      result['device_peak_bytes'] = self.torch.cuda.max_memory_allocated()
    return result


# ---------------------------------------------------------------------------------------- input


class InputWorker:
  """train_iterator on an image folder, cache on: the time to deliver batches on the host."""

  def __init__(self, spec):
    from ffkd_jax import data, defaults  # pylint: disable=g-import-not-at-top

    config = defaults.dataset_config()
    config.name = data.IMAGE_FOLDER
    config.path = spec['path']
    config.val_fraction = spec.get('val_fraction', 0.1)
    config.mean, config.std = data.MEAN_STD['cifar10']
    config.cache = True
    source = data.open_source(config)
    info = source.info
    self.iterator = data.train_iterator(source, local_batch_size=spec['batch'], seed=0)
    start = time.perf_counter()
    first = next(self.iterator)  # decodes the whole split into the cache
    cache_fill_s = time.perf_counter() - start
    warmup_s = self.time('input', spec.get('warmup_batches', 20))
    self.ready = {
        'cache_fill_s': cache_fill_s,
        'warmup_s': warmup_s,
        'image_shape': list(first['image'].shape),
        'num_train': info.num_train,
        'rss_after_cache_mb': peak_rss_mb(),
    }

  def time(self, what: str, count: int) -> list[float]:
    """One entry: the seconds for `count` batches (each batch alone is too short to time)."""
    del what
    start = time.perf_counter()
    for _ in range(count):
      next(self.iterator)
    return [time.perf_counter() - start]

  def final(self) -> dict:
    return {'rss_peak_mb': peak_rss_mb()}


# ----------------------------------------------------------------------------------------- main

KINDS = {'jax': JaxWorker, 'torch': TorchWorker, 'input': InputWorker}


def main(argv) -> int:
  spec = json.loads(argv[1])
  channel = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # stray prints and library logs go to stderr, never into the protocol
  sys.stdout = sys.stderr

  def send(message):
    channel.write(json.dumps(message) + '\n')
    channel.flush()

  try:
    worker = KINDS[spec['kind']](spec)
    send({'ready': worker.ready})
    for line in sys.stdin:
      command = json.loads(line)
      if command['cmd'] == 'quit':
        send({'final': worker.final()})
        return 0
      send({'seconds': worker.time(command['what'], command['count']), 'count': command['count']})
  except Exception:  # pylint: disable=broad-except; reported to the coordinator
    send({'error': traceback.format_exc()})
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
