"""The CPU convolution kernels of `conv_impl='auto'`: build, registration and calls.

Two XLA FFI custom calls, float32 and NHWC, compiled together on first use with the host's C++
compiler (`$CXX`, else `c++` / `g++` / `clang++`, `-O3 -march=native`) against jaxlib's FFI
headers into one library in a cache directory (`$FFKD_JAX_CACHE`, else
`~/.cache/ffkd_jax/kernels`) keyed by the sources, jaxlib's version and the host's CPU flags, so
a second process loads it. Without a compiler, or when the build fails, or with
FFKD_JAX_CPU_KERNEL=0 in the environment, `available()` is False (logged once) and the callers
use XLA's convolutions.

- `kernels/conv_weight_grad.cc`, the weight gradient, read in place where XLA's CPU backend
  first transposes the input to (C, H, W, N) for an Eigen convolution (benchmarks/README.md, a
  3x3 convolution at batch 64, both on two threads, 2026-12-02: 16 channels at 32x32 1.39
  against 5.40 ms, 32 at 16x16 1.09 / 2.21, 64 at 8x8 1.15 / 1.94, 64 at 32x32 17.5 / 37.8,
  128 at 16x16 17.0 / 21.9, the strided 1x1 64 -> 128 1.30 / 7.17, but 256 at 8x8 18.0 / 17.5,
  which `supports` leaves to XLA).
- `kernels/conv_forward.cc`, a direct convolution (no packing of image patches): the forward
  pass and the stride-1 input gradient (the same convolution of dy with the kernel flipped and
  its channel axes swapped, `input_gradient`). Isolated, batch 64, 3x3, stride 1 unless said,
  both on two threads (`benchmarks/README.md`, 2026-12-02 02:55): 16 -> 16 channels at 32x32
  1.12 against XLA's 1.99 ms, 32 at 16x16 0.83 / 1.18, 64 at 8x8 0.83 / 1.15, 16 -> 32 at
  stride 2 0.53 / 0.71, the strided 1x1 0.14 / 0.23, 64 at 32x32 14.2 / 17.8, 128 at 16x16
  13.6 / 14.6, and 256 at 8x8 14.0 / 13.9, a tie, which `supports_forward` leaves to XLA
  (before its weights were repacked by block of output channels, 36.5 ms there).

Both run on XLA's intra-op threads (the FFI's thread pool: the calling thread and tasks on the
pool take work from a shared counter). XLA's CPU runtime runs one custom call at a time, so a
one-thread kernel leaves a core idle: with the input gradient ours and the weight gradient on
one thread (as it was while XLA's Eigen input gradient ran beside it), the resnet56 CE step
went from 357 to 432 ms, cores busy 1.96 -> 1.63; with both on two threads, 345-360 -> 313-338
ms (2026-12-02). The weight gradient splits the images into 4 fixed groups summed in order, so
its result does not depend on which thread took which group.

`supports` and `supports_forward` say which convolutions each takes (float32, ungrouped,
channel counts the vector blocks divide, and where they were measured faster than XLA's).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

TARGET = 'ffkd_conv_weight_grad'
FORWARD_TARGET = 'ffkd_conv_forward'
_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels')
_SOURCES = tuple(os.path.join(_KERNELS, f) for f in ('conv_weight_grad.cc', 'conv_forward.cc'))
_HEADER = os.path.join(_KERNELS, 'pool.h')  # included by both: part of the cache key
_SYMBOLS = {TARGET: 'FfkdConvWeightGrad', FORWARD_TARGET: 'FfkdConvForward'}


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return line
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top

  return platform.processor() + platform.machine()


def _library_path(compiler: str) -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top

  source = b''
  for name in _SOURCES + (_HEADER,):
    with open(name, 'rb') as f:
      source += f.read()
  key = hashlib.sha256(
      source + jaxlib.__version__.encode() + compiler.encode() + _cpu_flags().encode()
  ).hexdigest()[:16]
  cache = os.environ.get('FFKD_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ffkd_jax', 'kernels'
  )
  return os.path.join(cache, f'conv_weight_grad-{key}.so')


def _build(compiler: str, path: str, extra_flags: tuple[str, ...] = ()) -> None:
  """Compiles the kernel to `path` atomically (a temporary file, then a rename), so that
  concurrent first uses (test workers, data-parallel processes) never load a partial file.
  `extra_flags` go after `-march=native` (the tests build the AVX2 variant with them)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(handle)
  command = [
      compiler, '-O3', '-march=native', *extra_flags, '-std=c++17', '-shared', '-fPIC', '-w',
      f'-I{jax.ffi.include_dir()}', *_SOURCES, '-o', tmp,
  ]  # fmt: skip
  try:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    os.replace(tmp, path)
  except (subprocess.SubprocessError, OSError):
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Builds (once per host) and registers the kernels; False where that is not possible, or
  where the environment variable FFKD_JAX_CPU_KERNEL=0 turns it off."""
  if os.environ.get('FFKD_JAX_CPU_KERNEL', '1') == '0':
    logging.info("FFKD_JAX_CPU_KERNEL=0: the CPU convolutions use XLA's weight gradient.")
    return False
  compiler = _compiler()
  if compiler is None:
    logging.warning("No C++ compiler found: the CPU convolutions use XLA's weight gradient.")
    return False
  path = _library_path(compiler)
  try:
    if not os.path.exists(path):
      _build(compiler, path)
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in _SYMBOLS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), 'cpu')
  except (subprocess.SubprocessError, OSError, AttributeError) as error:
    details = getattr(error, 'stderr', '') or error
    logging.warning("The CPU weight-gradient kernel did not build (%s); using XLA's.", details)
    return False
  return True


def supports(x, dy, kernel_shape, groups: int) -> bool:
  """Whether the kernel takes this convolution's weight gradient: float32, ungrouped, channels
  multiples of 8 (in) and 16 (out), and where it was measured faster than XLA's (batch 64,
  benchmarks/README.md, 2026-12-02, both on two threads): up to 128 x 256 channels (128 at
  16x16 16.97 against 21.89 ms, 64 -> 128 at stride 2 9.45 against 16.70, 128 -> 256 at stride
  2 10.27 against 10.55); at 256 x 256 on 8x8 maps it ties XLA's Eigen kernel (17.99 against
  17.53 ms), which keeps those."""
  return (
      groups == 1
      and x.dtype == jnp.float32
      and dy.dtype == jnp.float32
      and x.ndim == 4
      and x.shape[-1] % 8 == 0
      and kernel_shape[-1] % 16 == 0
      and kernel_shape[2] * kernel_shape[3] <= 128 * 256
  )


def weight_gradient(x, dy, kernel_shape, strides, padding, target: str = TARGET) -> jax.Array:
  """dW (kernel_shape, HWIO) of an NHWC convolution with `strides` and `padding` ((top,
  bottom), (left, right)), from its input `x` and output gradient `dy`: the custom call
  (`target`: another registered build of the same source, in the tests)."""
  if target == TARGET and not available():
    raise RuntimeError('the CPU weight-gradient kernel is not available here (see the log)')
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32))
  return call(
      x,
      dy,
      sh=np.int64(strides[0]),
      sw=np.int64(strides[1]),
      pt=np.int64(padding[0][0]),
      pl=np.int64(padding[1][0]),
  )


def supports_forward(x, w_shape, groups: int, padding=((0, 0), (0, 0)), strides=(1, 1)) -> bool:
  """Whether `forward` takes this convolution: float32, ungrouped, NHWC, input channels a
  multiple of 8 (not the 3-channel stems), output channels of 16, a kernel at most 16 rows
  tall, at most 128 x 128 channels (256 x 256 ties XLA's: see the module docstring), padding
  never negative and an output of at least one pixel."""
  if not (x.ndim == 4 and len(w_shape) == 4):
    return False
  sides = zip(x.shape[1:3], w_shape[:2], padding)
  return (
      groups == 1
      and x.dtype == jnp.float32
      and x.shape[-1] % 8 == 0
      and w_shape[-1] % 16 == 0
      and w_shape[0] <= 16
      and w_shape[2] * w_shape[3] <= 128 * 128
      and all(p >= 0 for pair in padding for p in pair)
      and all(size + a + b >= k for size, k, (a, b) in sides)
      and all(s >= 1 for s in strides)
  )


def forward(x, w, strides, padding, target: str = FORWARD_TARGET) -> jax.Array:
  """The NHWC convolution of `x` with the HWIO kernel `w`, `strides` and `padding` ((top,
  bottom), (left, right)): the custom call (`target`: another registered build, in the tests)."""
  if target == FORWARD_TARGET and not available():
    raise RuntimeError('the CPU convolution kernels are not available here (see the log)')
  n, h, width, _ = x.shape
  kh, kw, _, o = w.shape
  (pt, pb), (pl, pr) = padding
  out_h = (h + pt + pb - kh) // strides[0] + 1
  out_w = (width + pl + pr - kw) // strides[1] + 1
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((n, out_h, out_w, o), jnp.float32))
  return call(
      x,
      w,
      sh=np.int64(strides[0]),
      sw=np.int64(strides[1]),
      pt=np.int64(pt),
      pl=np.int64(pl),
      pr=np.int64(pr),
  )


def supports_input_gradient(dy, w_shape, strides, padding, groups: int) -> bool:
  """Whether `input_gradient` takes this convolution's: stride 1, every padding at most the
  kernel size - 1, and `supports_forward` of the transposed convolution (dy's channels in, the
  input's out)."""
  flipped = (w_shape[0], w_shape[1], w_shape[3], w_shape[2])
  if not all(0 <= p <= k - 1 for pair, k in zip(padding, w_shape[:2]) for p in pair):
    return False
  pads = tuple((k - 1 - a, k - 1 - b) for (a, b), k in zip(padding, w_shape[:2]))
  return tuple(strides) == (1, 1) and supports_forward(dy, flipped, groups, pads)


def input_gradient(dy, w, padding, target: str = FORWARD_TARGET) -> jax.Array:
  """dx of a stride-1 NHWC convolution with kernel `w` and `padding`, from its output gradient
  `dy`: the convolution of dy with w flipped in space and its channel axes swapped, padded by
  kernel size - 1 - padding on each side (every padding at most kernel size - 1)."""
  kh, kw = w.shape[:2]
  (pt, pb), (pl, pr) = padding
  flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  pads = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
  return forward(dy, flipped, (1, 1), pads, target)
