"""The zoo's convolution, and how it runs on the CPU (`config.conv_impl`).

Every model convolution (`layers.conv2d`) calls `conv_general_dilated` here. `config.conv_impl`:

  'auto'    (default) XLA's convolutions everywhere. On the CPU three more things, each
            measured on the 2-core machine (benchmarks/README.md):
            - XLA runs convolutions with its own (Eigen) kernels instead of YNNPACK's
              convolution fusion, the CPU default of JAX 0.10, which is 1.3-1.7x slower on a
              ResNet train step here;
            - the backward pass reads the convolution's input and output gradient through an
              optimization barrier (a custom VJP: XLA's own input and weight gradients of the
              barrier's outputs). Without it XLA's CPU fusion recomputes, inside the transpose
              that feeds each weight gradient, the whole elementwise chain that produced the
              input: batch norm, residual add and ReLU back to the stage's first block, so a
              stage of L blocks costs O(L^2) (without them, 67% of a resnet56 step's op time);
            - `materialize` (a barrier on each residual block's outputs) cuts the same chain in
              the forward pass;
            - where `conv_kernel.supports` it, the weight gradient is our own kernel (an XLA FFI
              custom call, `conv_kernel.py`), which reads the NHWC input in place where XLA
              transposes it for Eigen (isolated, 16 channels at 32x32: 1.39 against 5.40 ms,
              both on two threads, 2026-12-02; benchmarks/README.md);
            - where `conv_kernel.supports_forward` it, the forward convolution is our direct
              convolution (another custom call), which does not pack image patches as Eigen
              does (isolated, 16 channels at 32x32: 1.12 against 1.99 ms; the resnet56 ->
              resnet20 FFKD step 670-694 -> 591-626 ms, 2026-12-02), and so is the input
              gradient of a stride-1 convolution (`supports_input_gradient`: the convolution
              of dy with the kernel flipped and its channel axes swapped; that FFKD step
              586 -> 547-555 ms). Both kernels run on XLA's intra-op threads.
              Without a C++ compiler XLA's convolutions run.
            The barriers are `lax.platform_dependent`: on GPU and TPU the traced program is
            XLA's plain convolution. XLA's CPU pipeline removes optimization barriers before
            fusion unless its `cse_barrier_expander` pass is off, so 'auto' sets both XLA flags
            of `CPU_XLA_FLAGS` in XLA_FLAGS before the CPU backend starts (`prepare_backend`).
  'xla'     XLA's defaults: no flag, no custom VJP, no barrier.
  'matmul'  XLA's forward and input gradient, and the weight gradient as one matrix product per
            kernel tap: dW[i, j] = sum_{n, h, w} x_pad[n, s h + i, s w + j, :]^T dy[n, h, w, :]
            (per group), accumulated in float32 (a custom VJP). Measured here it beats XLA's
            YNNPACK weight gradient (1.39x on resnet32x4) but not its Eigen one: kept as an
            option and for other CPUs, not the default.

The choice is process-wide, like the XLA flags it may set: `train_and_evaluate` and the CLI set
it from `config.conv_impl` (`configure`) before anything is traced, and it applies to functions
traced after it is set. Dilated convolutions (none in the zoo) always take XLA's path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from ffkd_jax import host_memory
from ffkd_jax.models import conv_kernel

IMPLEMENTATIONS = ('auto', 'xla', 'matmul')
# Eigen's convolutions instead of YNNPACK's; keep optimization barriers through fusion.
CPU_XLA_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
    '--xla_disable_hlo_passes=cse_barrier_expander',
)
_YNN_FLAG, _PASSES_FLAG = CPU_XLA_FLAGS
_PASS = _PASSES_FLAG.split('=')[1]
NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
_state = {'implementation': 'auto'}


def implementation() -> str:
  return _state['implementation']


def set_implementation(name: str, field: str = 'config.conv_impl') -> None:
  """Sets the process-wide implementation; raises naming `field` for an unknown name."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'{field}={name!r} is not valid: use one of {", ".join(IMPLEMENTATIONS)}.')
  _state['implementation'] = name


@contextlib.contextmanager
def using(name: str):
  """Temporarily sets the implementation (for tracing functions under it)."""
  previous = implementation()
  set_implementation(name)
  try:
    yield
  finally:
    set_implementation(previous)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another JAX: assume started, never touch XLA_FLAGS
    return True


def _jaxlib_version() -> tuple[int, ...]:
  import jaxlib  # pylint: disable=g-import-not-at-top

  return tuple(int(p) for p in jaxlib.__version__.split('.')[:2] if p.isdigit())


def _flag_value(flags: str, name: str) -> str | None:
  """The value of the last `name=...` in an XLA_FLAGS string, or None."""
  value = None
  for token in flags.split():
    key, _, rest = token.partition('=')
    if key == name:
      value = rest
  return value


def cpu_flag_active() -> bool:
  """Whether XLA_FLAGS chooses the convolution kernels (ours, Eigen, or a user's own choice)."""
  return _flag_value(os.environ.get('XLA_FLAGS', ''), _YNN_FLAG.split('=')[0]) is not None


def barriers_kept() -> bool:
  """Whether XLA_FLAGS turns off the CPU pass that removes optimization barriers."""
  passes = _flag_value(os.environ.get('XLA_FLAGS', ''), _PASSES_FLAG.split('=')[0])
  return passes is not None and _PASS in passes.split(',')


def _with_cpu_flags(flags: str) -> str:
  """`flags` plus CPU_XLA_FLAGS, keeping a user's own choice of kernels and adding our pass to a
  user's own list of disabled passes."""
  tokens = flags.split()
  if _flag_value(flags, _YNN_FLAG.split('=')[0]) is None:
    tokens.append(_YNN_FLAG)
  name = _PASSES_FLAG.split('=')[0]
  passes = _flag_value(flags, name)
  if passes is None:
    tokens.append(_PASSES_FLAG)
  elif _PASS not in passes.split(','):
    tokens = [t for t in tokens if t.partition('=')[0] != name]
    tokens.append(f'{name}={passes},{_PASS}' if passes else _PASSES_FLAG)
  return ' '.join(tokens)


def prepare_backend(name: str) -> bool:
  """For 'auto', adds CPU_XLA_FLAGS to XLA_FLAGS (keeping a user's own choices, see
  `_with_cpu_flags`), and tells glibc to keep freed memory (`host_memory.keep_freed_memory`).

  Only takes effect before JAX starts its backends; returns whether both flags are in force (a
  warning says so when they came too late, e.g. in a notebook that ran JAX first).
  """
  if name != 'auto':
    return cpu_flag_active() and barriers_kept()
  host_memory.keep_freed_memory()
  flags = os.environ.get('XLA_FLAGS', '')
  if _with_cpu_flags(flags) == flags:
    return True
  if _jaxlib_version() < (0, 10):  # the flags were verified on jaxlib 0.10; XLA aborts on unknown
    logging.warning(
        "config.conv_impl='auto': jaxlib %s predates the XLA flags; not set.",
        '.'.join(map(str, _jaxlib_version())),
    )
    return False
  if _backends_started():
    logging.warning(
        "config.conv_impl='auto': JAX's backends are already started, so the CPU keeps "
        "YNNPACK's (slower) convolutions and drops the optimization barriers; set "
        "XLA_FLAGS='%s' before JAX starts, or call "
        "ffkd_jax.models.conv.prepare_backend('auto') first.",
        ' '.join(CPU_XLA_FLAGS),
    )
    return False
  os.environ['XLA_FLAGS'] = _with_cpu_flags(flags)
  return True


def configure(name: str, field: str = 'config.conv_impl') -> None:
  """`set_implementation` and `prepare_backend` together (what a run does from its config)."""
  set_implementation(name, field)
  prepare_backend(name)


def describe() -> str:
  """What the convolutions do on this process's default backend, for logs and benchmarks."""
  name = implementation()
  if name == 'matmul':
    return "matmul (XLA's forward and input gradient, a tap-matmul weight gradient)"
  if jax.default_backend() != 'cpu':
    return f"{name} (XLA's {jax.default_backend()} convolutions)"
  eigen = cpu_flag_active()
  kernels = 'Eigen' if eigen else 'YNNPACK'
  if name == 'auto':
    barriers = 'kept' if barriers_kept() else 'removed by XLA'
    ours = (
        'forward, stride-1 input and weight gradients ours where faster'
        if conv_kernel.available()
        else "XLA's only (no C++ compiler)"
    )
    return (
        f"auto (XLA's CPU convolutions, {kernels} kernels, backward barriers {barriers}, "
        f'{ours}; {host_memory.describe()})'
    )
  return f"{name} (XLA's CPU convolutions, {kernels} kernels)"


def _cpu_barrier(*tree):
  """An optimization barrier on the CPU, nothing elsewhere (decided when lowering)."""

  def barrier(*tree):
    return lax.optimization_barrier(tree)

  return lax.platform_dependent(*tree, cpu=barrier, default=lambda *tree: tree)


def materialize(tree):
  """Under 'auto', `tree`'s arrays computed once, in memory, on the CPU: XLA may not fuse their
  computation into what reads them (see the module docstring). Identity otherwise."""
  if implementation() != 'auto':
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(_cpu_barrier(*leaves)))


def _xla_conv(x, w, strides, padding, groups):
  return lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=NHWC, feature_group_count=groups
  )


def weight_gradient(x, dy, kernel_shape, strides, padding, groups) -> jax.Array:
  """d(conv(x, w))/dw applied to dy, as one matrix product per kernel tap (float32 sums).

  x (n, h, w, c_in) NHWC, dy (n, h_out, w_out, c_out), kernel_shape (kh, kw, c_in / groups,
  c_out) HWIO; padding ((top, bottom), (left, right)). Returns dW with the kernel's shape.
  """
  kh, kw, c_group, c_out = kernel_shape
  sh, sw = strides
  h_out, w_out = dy.shape[1:3]
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  n = x.shape[0]
  o_group = c_out // groups
  dy = dy.reshape(n, h_out, w_out, groups, o_group)
  taps = []
  for i in range(kh):
    for j in range(kw):
      patch = lax.slice(
          x,
          (0, i, j, 0),
          (n, i + sh * (h_out - 1) + 1, j + sw * (w_out - 1) + 1, x.shape[3]),
          (1, sh, sw, 1),
      )  # (n, h_out, w_out, c_in)
      patch = patch.reshape(n, h_out, w_out, groups, c_group)
      tap = jnp.einsum('nhwgc,nhwgo->cgo', patch, dy, preferred_element_type=jnp.float32)
      taps.append(tap.reshape(c_group, c_out))
  return jnp.stack(taps).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul_grad_conv(x, w, strides, padding, groups):
  return _xla_conv(x, w, strides, padding, groups)


def _forward(x, w, strides, padding, groups):
  return _xla_conv(x, w, strides, padding, groups), (x, w)


def match_cotangent(cotangent, primal):
  """The cotangent summed over the mapped axes it varies over and its primal does not (inside
  shard_map: a replicated kernel's gradient is the sum over devices, as XLA's transpose gives)."""
  extra = _varying(cotangent) - _varying(primal)
  return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _varying(x) -> frozenset:
  """The mapped axes `x` varies over inside shard_map (empty outside it)."""
  aval = jax.typeof(x)
  manual = getattr(aval, 'manual_axis_type', None)  # JAX 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, 'vma', ()))  # earlier JAX


def _backward(strides, padding, groups, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, groups), x)
  (dx,) = input_vjp(dy)
  dw = weight_gradient(x, dy, w.shape, strides, padding, groups).astype(w.dtype)
  return match_cotangent(dx, x), match_cotangent(dw, w)


_matmul_grad_conv.defvjp(_forward, _backward)


def _on_cpu() -> bool:
  """Whether the CPU branch of a `platform_dependent` can run (else it is never built)."""
  return jax.default_backend() == 'cpu'


def _per_device(y, *inputs):
  """A custom call's output inside shard_map (typed as replicated) marked as varying over the
  mapped axes its inputs vary over."""
  varying = frozenset().union(*(_varying(v) for v in inputs))
  return lax.pcast(y, tuple(sorted(varying)), to='varying') if varying else y


def _auto_conv(x, w, strides, padding, groups):
  """The forward convolution of 'auto': `conv_kernel.forward` on the CPU where it applies."""
  if (
      _on_cpu()
      and conv_kernel.supports_forward(x, w.shape, groups, padding, strides)
      and conv_kernel.available()
  ):
    kernel = lambda x, w: _per_device(conv_kernel.forward(x, w, strides, padding), x, w)
    xla = lambda x, w: _xla_conv(x, w, strides, padding, groups)
    return lax.platform_dependent(x, w, cpu=kernel, default=xla)
  return _xla_conv(x, w, strides, padding, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _barrier_grad_conv(x, w, strides, padding, groups):
  return _auto_conv(x, w, strides, padding, groups)


def _auto_forward(x, w, strides, padding, groups):
  return _auto_conv(x, w, strides, padding, groups), (x, w)


def _barrier_backward(strides, padding, groups, residuals, dy):
  x, w = residuals
  x, dy = _cpu_barrier(x, dy)

  def xla_input_gradient(dy, w):
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, groups), x)
    return input_vjp(dy)[0]

  def kernel_input_gradient(dy, w):
    return _per_device(conv_kernel.input_gradient(dy, w, padding), dy, w)

  if (
      _on_cpu()
      and conv_kernel.supports_input_gradient(dy, w.shape, strides, padding, groups)
      and conv_kernel.available()
  ):
    dx = lax.platform_dependent(dy, w, cpu=kernel_input_gradient, default=xla_input_gradient)
  else:
    dx = xla_input_gradient(dy, w)

  def xla_weight_gradient(x, dy):
    _, weight_vjp = jax.vjp(lambda w: _xla_conv(x, w, strides, padding, groups), w)
    return weight_vjp(dy)[0]

  def kernel_weight_gradient(x, dy):
    # Inside shard_map the custom call returns this device's partial sum, typed as replicated:
    # mark it per-device, then sum over the axes the kernel does not vary over (as XLA's own
    # transpose of the convolution does).
    dw = conv_kernel.weight_gradient(x, dy, w.shape, strides, padding).astype(w.dtype)
    dw = _per_device(dw, x, dy)
    summed = tuple(sorted(_varying(dw) - _varying(w)))
    return lax.psum(dw, summed) if summed else dw

  if _on_cpu() and conv_kernel.supports(x, dy, w.shape, groups) and conv_kernel.available():
    dw = lax.platform_dependent(x, dy, cpu=kernel_weight_gradient, default=xla_weight_gradient)
  else:
    dw = xla_weight_gradient(x, dy)
  return match_cotangent(dx, x), match_cotangent(dw, w)


_barrier_grad_conv.defvjp(_auto_forward, _barrier_backward)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
):
  """`lax.conv_general_dilated`'s signature (what flax's nn.Conv calls), NHWC / HWIO."""
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  standard = (
      lhs.ndim == 4
      and not dilated
      and batch_group_count == 1
      and precision is None
      and preferred_element_type is None
      and not isinstance(padding, str)
      and dimension_numbers is not None
      and tuple(dimension_numbers) == tuple(NHWC)
  )
  if not standard or implementation() == 'xla':
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
  strides = tuple(int(s) for s in window_strides)
  pads = tuple((int(a), int(b)) for a, b in padding)
  if implementation() == 'matmul':
    return _matmul_grad_conv(lhs, rhs, strides, pads, feature_group_count)
  return _barrier_grad_conv(lhs, rhs, strides, pads, feature_group_count)
