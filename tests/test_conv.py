"""The CPU convolution paths ('auto': barriers in the VJP; 'matmul': a tap-matmul weight gradient)
against XLA's own, on every kind of convolution the zoo has."""

import ctypes
import functools
import os
import platform as platform_lib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffkd_jax import models
from ffkd_jax.models import conv, conv_kernel


@functools.lru_cache(maxsize=None)
def zoo_convolutions() -> tuple:
  """Every distinct convolution of every registered model: (in shape, kernel shape, strides,
  padding, groups), recorded while tracing the models (no computation)."""
  seen = set()
  real = conv.conv_general_dilated

  def recording(lhs, rhs, window_strides, padding, **kwargs):
    seen.add(
        (
            tuple(lhs.shape[1:]),
            tuple(rhs.shape),
            tuple(window_strides),
            tuple(tuple(p) for p in padding),
            kwargs.get('feature_group_count', 1),
        )
    )
    return real(lhs, rhs, window_strides, padding, **kwargs)

  conv.conv_general_dilated = recording
  try:
    for name in models.available_models():
      size = models.model_input_size(name)
      model = models.create_model(name, 10)
      x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
      jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  finally:
    conv.conv_general_dilated = real
  return tuple(sorted(seen))


def _kinds(convolutions):
  """One representative (the smallest) per (kernel, stride, padding, grouping) kind."""
  kinds = {}
  for in_shape, kernel, strides, padding, groups in convolutions:
    grouping = 'depthwise' if groups > 1 and kernel[2] == 1 else ('grouped' if groups > 1 else '')
    key = (kernel[:2], strides, padding, grouping)
    size = in_shape[0] * in_shape[1] * kernel[2] * kernel[3]
    if key not in kinds or size < kinds[key][0]:
      kinds[key] = (size, (in_shape, kernel, strides, padding, groups))
  return [v[1] for _, v in sorted(kinds.items())]


def test_the_zoo_has_the_kinds_of_convolution_we_test():
  kinds = {(k[:2], s, g > 1) for _, k, s, _, g in zoo_convolutions()}
  for expected in [((3, 3), (1, 1), False), ((3, 3), (2, 2), False), ((1, 1), (1, 1), False)]:
    assert expected in kinds
  assert ((1, 1), (2, 2), False) in kinds  # projection shortcuts
  assert ((7, 7), (2, 2), False) in kinds  # the ImageNet stem
  assert any(grouped for _, _, grouped in kinds)  # ShuffleNet / MobileNet


def _shrunk(in_shape, kernel, groups):
  """A small input of the same kind: side at most 9 (keeping its parity), batch 3."""
  h = in_shape[0] if in_shape[0] <= 9 else 8 + in_shape[0] % 2
  w = in_shape[1] if in_shape[1] <= 9 else 8 + in_shape[1] % 2
  c_in = kernel[2] * groups
  return (3, h, w, c_in)


def _grads(impl, x, w, strides, padding, groups, cotangent):
  with conv.using(impl):
    fn = jax.jit(
        lambda x, w: conv.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=conv.NHWC, feature_group_count=groups
        )
    )
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(cotangent))


@pytest.mark.parametrize('impl', ['auto', 'matmul'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cpu_paths_give_xla_outputs_and_gradients(impl, dtype):
  dtype = jnp.dtype(dtype)
  tolerance = {'float32': 2e-5, 'bfloat16': 2e-2}[dtype.name]
  rng = np.random.default_rng(0)
  for in_shape, kernel, strides, padding, groups in _kinds(zoo_convolutions()):
    shape = _shrunk(in_shape, kernel, groups)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    w = jnp.asarray(rng.normal(size=kernel) / np.sqrt(np.prod(kernel[:3])), dtype)
    with conv.using('xla'):
      out_shape = jax.eval_shape(
          lambda x, w: conv.conv_general_dilated(
              x, w, strides, padding, dimension_numbers=conv.NHWC, feature_group_count=groups
          ),
          x,
          w,
      ).shape
    cotangent = jnp.asarray(rng.normal(size=out_shape), dtype)
    want = _grads('xla', x, w, strides, padding, groups, cotangent)
    got = _grads(impl, x, w, strides, padding, groups, cotangent)
    for name, a, b in zip(('output', 'input gradient', 'weight gradient'), got, want):
      assert a.dtype == b.dtype and a.shape == b.shape, name
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      scale = max(float(np.abs(b).max()), 1e-6)
      err = float(np.abs(a - b).max()) / scale
      assert err < tolerance, (impl, name, kernel, strides, groups, dtype.name, err)


def test_weight_gradient_against_a_numpy_loop():
  """The tap formula itself, independently: dW[i, j, c, o] = sum x_pad[n, s h + i, s w + j, c]
  dy[n, h, w, o], here for a stride-2, 3x3, 2-group convolution."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
  dy = rng.normal(size=(2, 3, 3, 6)).astype(np.float32)
  groups, kernel = 2, (3, 3, 2, 6)
  got = np.asarray(conv.weight_gradient(x, dy, kernel, (2, 2), ((1, 1), (1, 1)), groups))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros(kernel, np.float64)
  for i in range(3):
    for j in range(3):
      for o in range(6):
        g = o // 3
        for c in range(2):
          want[i, j, c, o] = np.sum(xp[:, i : i + 5 : 2, j : j + 5 : 2, g * 2 + c] * dy[..., o])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_choice_is_checked_and_auto_sets_the_cpu_flags_before_the_backend(monkeypatch):
  with pytest.raises(ValueError, match=r"config.conv_impl='fast' is not valid"):
    conv.set_implementation('fast')
  kernels, passes = conv.CPU_XLA_FLAGS
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.setattr(conv, '_backends_started', lambda: False)
  assert not conv.prepare_backend('xla') and kernels not in os.environ['XLA_FLAGS']
  assert conv.prepare_backend('auto')
  assert os.environ['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {kernels} {passes}'
  assert conv.cpu_flag_active() and conv.barriers_kept()
  assert conv.prepare_backend('auto')  # a second call changes nothing
  assert os.environ['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {kernels} {passes}'
  # A user's own choice of kernels is kept; a user's own disabled passes are kept and extended.
  monkeypatch.setenv(
      'XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot --xla_disable_hlo_passes=foo'
  )
  assert conv.prepare_backend('auto')
  assert os.environ['XLA_FLAGS'] == (
      '--xla_cpu_experimental_ynn_fusion_type=dot --xla_disable_hlo_passes=foo,cse_barrier_expander'
  )
  # Too late (the backend started without them): a warning, and False.
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setattr(conv, '_backends_started', lambda: True)
  assert not conv.prepare_backend('auto') and os.environ['XLA_FLAGS'] == ''
  assert not conv.barriers_kept()


def _weight_grad_program(impl, platform):
  """The StableHLO of a conv's weight gradient under `impl`, lowered for `platform` (no device
  of that platform is needed to lower)."""
  x = jnp.ones((2, 6, 6, 4))
  w = jnp.ones((3, 3, 4, 5))

  def grad(w):
    def loss(w):
      y = conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC)
      return jnp.sum(conv.materialize(y) ** 2)

    return jax.grad(loss)(w)

  with conv.using(impl):
    return jax.export.export(jax.jit(grad), platforms=[platform])(w).mlir_module()


def test_what_each_choice_traces_on_each_platform():
  # XLA's weight gradient is a convolution; the matmul path's is dot products (9 taps).
  cpu = {impl: _weight_grad_program(impl, 'cpu') for impl in conv.IMPLEMENTATIONS}
  assert 'stablehlo.dot_general' not in cpu['auto']
  assert cpu['matmul'].count('stablehlo.dot_general') == 9
  # 'auto' puts barriers on the CPU only: one on the conv's input and output gradient in the
  # backward pass, one on materialize's output and one on its cotangent (a barrier's transpose);
  # 'xla' never; on GPU and TPU 'auto' is XLA's program.
  assert cpu['auto'].count('stablehlo.optimization_barrier') == 3
  assert 'stablehlo.optimization_barrier' not in cpu['xla']
  for platform in ('cuda', 'tpu'):
    assert 'stablehlo.optimization_barrier' not in _weight_grad_program('auto', platform)


def test_materialize_is_the_identity_for_values_and_gradients():
  rng = np.random.default_rng(4)
  tree = {'a': jnp.asarray(rng.normal(size=(3, 4))), 'b': (jnp.asarray(rng.normal(size=2)),)}
  f = lambda t: jnp.sum(jnp.sin(t['a'])) * jnp.sum(t['b'][0] ** 2)
  with conv.using('auto'):
    out = jax.jit(conv.materialize)(tree)
    grads = jax.jit(jax.grad(lambda t: f(conv.materialize(t))))(tree)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(f)(tree))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _sharded_kernel_gradient(impl, x_shape, kernel_shape, strides, seed):
  """The kernel gradient of sum(conv(x, w)^2) inside shard_map over 2 devices (x split over
  them, w replicated), under `impl`: (gradient, the lowered program's text)."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
  rng = np.random.default_rng(seed)
  x = jax.device_put(
      jnp.asarray(rng.normal(size=x_shape), jnp.float32), NamedSharding(mesh, P('data'))
  )
  w = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)

  def per_device(w, x):
    loss = lambda w: jnp.sum(
        conv.conv_general_dilated(x, w, strides, ((1, 1), (1, 1)), dimension_numbers=conv.NHWC) ** 2
    )
    return jax.grad(loss)(w)

  with conv.using(impl):
    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data')), out_specs=P()))
    return np.asarray(fn(w, x)), fn.lower(w, x).as_text()


@pytest.mark.parametrize('impl', ['auto', 'matmul'])
def test_cpu_paths_under_shard_map_sum_the_kernel_gradient_over_devices(impl):
  """Inside the data-parallel step a replicated kernel's gradient is summed over devices; the
  custom VJP's must equal XLA's (the psum over the axes the cotangent varies over)."""
  args = ((4, 6, 6, 3), (3, 3, 3, 5), (2, 2), 3)
  got, _ = _sharded_kernel_gradient(impl, *args)
  want, _ = _sharded_kernel_gradient('xla', *args)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- the CPU weight-gradient kernel (conv_kernel.py, kernels/conv_weight_grad.cc) -----------


def test_the_cpu_kernel_builds_here():
  """CI machines have a C++ compiler; without one the kernel is off and XLA's path runs."""
  assert conv_kernel.available()


@pytest.fixture(scope='module')
def avx2_targets(tmp_path_factory) -> dict:
  """The kernels built without AVX-512, registered under their own names (once per process):
  {our target name: the AVX2 build's}."""
  path = str(tmp_path_factory.mktemp('kernel') / 'conv_kernels_avx2.so')
  conv_kernel._build(conv_kernel._compiler(), path, ('-mno-avx512f',))
  library = ctypes.cdll.LoadLibrary(path)
  targets = {}
  for target, symbol in conv_kernel._SYMBOLS.items():
    targets[target] = target + '_avx2'
    jax.ffi.register_ffi_target(targets[target], jax.ffi.pycapsule(getattr(library, symbol)), 'cpu')
  return targets


# The AVX2 build is an x86-64 one; elsewhere only the native build is tested.
_BUILDS = ['native'] + (['avx2'] if platform_lib.machine() in ('x86_64', 'AMD64') else [])


def _target(name, build, request):
  """The registered name of kernel `name` in `build` ('native', or 'avx2')."""
  return name if build == 'native' else request.getfixturevalue('avx2_targets')[name]


def _taps(x, kernel, strides, padding, out_hw):
  """(i, j, the float64 zero-padded input at tap (i, j) of every output pixel): the NumPy side
  of the kernel tests."""
  xp = np.pad(x.astype(np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
  (sh, sw), (ho, wo) = strides, out_hw
  for i in range(kernel[0]):
    for j in range(kernel[1]):
      yield i, j, xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


@pytest.mark.parametrize(
    'in_shape,kernel,strides,padding',
    [
        ((3, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
        ((3, 9, 7, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),  # odd sides, stride 2
        ((2, 8, 8, 24), (1, 1, 24, 16), (2, 2), ((0, 0), (0, 0))),  # projection shortcut
        ((2, 6, 5, 8), (3, 3, 8, 16), (1, 2), ((1, 1), (0, 2))),  # uneven strides and pads
        ((3, 32, 32, 48), (3, 3, 48, 32), (1, 1), ((1, 1), (1, 1))),  # one image per chunk
    ],
)
@pytest.mark.parametrize('build', _BUILDS)
def test_the_cpu_kernel_against_a_numpy_loop_and_xla(
    in_shape, kernel, strides, padding, build, request
):
  """Both vector widths of the C++: this host's (-march=native) and, on x86-64, the AVX2 one
  (built with -mno-avx512f, what an AVX2 host compiles; the same where the host is AVX2)."""
  target = _target(conv_kernel.TARGET, build, request)
  rng = np.random.default_rng(8)
  x = rng.normal(size=in_shape).astype(np.float32)
  w = np.zeros(kernel, np.float32)
  conv_fn = lambda x, w: conv._xla_conv(x, w, strides, padding, 1)
  out_shape = jax.eval_shape(conv_fn, x, w).shape
  dy = rng.normal(size=out_shape).astype(np.float32)
  got = np.asarray(
      jax.jit(lambda x, dy: conv_kernel.weight_gradient(x, dy, kernel, strides, padding, target))(
          x, dy
      )
  )
  xla = np.asarray(jax.vjp(lambda w: conv_fn(x, w), w)[1](dy)[0])
  want = np.zeros(kernel)
  for i, j, patch in _taps(x, kernel, strides, padding, out_shape[1:3]):
    want[i, j] = np.einsum('nhwc,nhwo->co', patch, dy)
  atol = 1e-5 * np.abs(want).max()  # float32 sums of up to 3,072 products
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(got, xla, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    'in_shape,kernel,strides,padding',
    [
        ((3, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
        ((3, 9, 7, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),  # odd sides, stride 2
        ((2, 8, 8, 24), (1, 1, 24, 16), (2, 2), ((0, 0), (0, 0))),  # projection shortcut
        ((2, 6, 5, 8), (3, 3, 8, 16), (1, 2), ((1, 1), (0, 2))),  # uneven strides and pads
        ((2, 5, 8, 16), (3, 3, 16, 64), (1, 1), ((1, 1), (1, 1))),  # 4 vectors of outputs
        ((2, 4, 19, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1))),  # 19: blocks and remainders
        ((2, 7, 7, 16), (5, 5, 16, 16), (1, 1), ((2, 2), (2, 2))),  # a 5x5 kernel
        ((2, 4, 6, 16), (3, 3, 16, 128), (1, 1), ((1, 1), (1, 1))),  # repacked: 2 blocks
        ((2, 4, 6, 24), (3, 3, 24, 96), (2, 1), ((1, 1), (1, 1))),  # 3 blocks of 32 (AVX-512)
        ((1, 32, 32, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),  # one image, full rows
        ((2, 3, 11, 16), (3, 3, 16, 64), (1, 1), ((1, 1), (1, 1))),  # 6 + 4 + 1 pixels
        ((2, 6, 7, 16), (1, 3, 16, 32), (1, 1), ((0, 0), (1, 1))),  # 1x3
        ((2, 6, 7, 16), (3, 1, 16, 32), (1, 1), ((1, 1), (0, 0))),  # 3x1: no copy, rows padded
        ((2, 12, 5, 8), (9, 1, 8, 16), (1, 1), ((4, 4), (0, 0))),  # 9 rows tall
    ],
)
@pytest.mark.parametrize('build', _BUILDS)
def test_the_forward_kernel_against_a_numpy_loop_and_xla(
    in_shape, kernel, strides, padding, build, request
):
  """The direct convolution, both vector widths (as the weight-gradient test above)."""
  target = _target(conv_kernel.FORWARD_TARGET, build, request)
  rng = np.random.default_rng(9)
  x = rng.normal(size=in_shape).astype(np.float32)
  w = rng.normal(size=kernel).astype(np.float32)
  got = np.asarray(jax.jit(lambda x, w: conv_kernel.forward(x, w, strides, padding, target))(x, w))
  xla = np.asarray(conv._xla_conv(x, w, strides, padding, 1))
  want = np.zeros(xla.shape)
  for i, j, patch in _taps(x, kernel, strides, padding, xla.shape[1:3]):
    want += np.einsum('nhwc,co->nhwo', patch, w[i, j])
  atol = 1e-5 * np.abs(want).max()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(got, xla, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    'in_shape,kernel,padding',
    [
        ((3, 8, 8, 16), (3, 3, 16, 16), ((1, 1), (1, 1))),
        ((2, 6, 5, 32), (3, 3, 32, 16), ((1, 0), (0, 2))),  # uneven pads, more in than out
        ((2, 5, 7, 16), (1, 1, 16, 64), ((0, 0), (0, 0))),
        ((2, 7, 7, 16), (5, 5, 16, 32), ((2, 2), (2, 2))),
        ((2, 6, 7, 16), (1, 3, 16, 16), ((0, 0), (1, 1))),  # 1x3
        ((1, 6, 7, 32), (3, 1, 32, 16), ((1, 1), (0, 0))),  # 3x1, one image
    ],
)
@pytest.mark.parametrize('build', _BUILDS)
def test_the_input_gradient_kernel_against_a_numpy_loop_and_xla(
    in_shape, kernel, padding, build, request
):
  """dx of a stride-1 convolution: dx[n, h, w, c] = sum over taps and outputs of
  dy[n, h + pt - i, w + pl - j, o] w[i, j, c, o], written as a scatter of each output's taps."""
  target = _target(conv_kernel.FORWARD_TARGET, build, request)
  rng = np.random.default_rng(10)
  x = rng.normal(size=in_shape).astype(np.float32)
  w = rng.normal(size=kernel).astype(np.float32)
  conv_fn = lambda x: conv._xla_conv(x, w, (1, 1), padding, 1)
  y, vjp = jax.vjp(conv_fn, x)
  dy = rng.normal(size=y.shape).astype(np.float32)
  xla = np.asarray(vjp(dy)[0])
  assert conv_kernel.supports_input_gradient(dy, kernel, (1, 1), padding, 1)
  got = np.asarray(jax.jit(lambda dy: conv_kernel.input_gradient(dy, w, padding, target))(dy))
  (pt, pb), (pl, pr) = padding
  dxp = np.zeros((in_shape[0], in_shape[1] + pt + pb, in_shape[2] + pl + pr, in_shape[3]))
  ho, wo = y.shape[1:3]
  for i in range(kernel[0]):
    for j in range(kernel[1]):
      dxp[:, i : i + ho, j : j + wo, :] += np.einsum('nhwo,co->nhwc', dy, w[i, j])
  want = dxp[:, pt : pt + in_shape[1], pl : pl + in_shape[2], :]
  atol = 1e-5 * np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(got, xla, rtol=1e-5, atol=atol)


def test_the_forward_kernel_takes_no_negative_padding_nor_an_empty_output():
  x = jnp.ones((2, 4, 4, 16))
  pad = ((1, 1), (1, 1))
  assert conv_kernel.supports_forward(x, (3, 3, 16, 16), 1, pad)
  assert not conv_kernel.supports_forward(x, (3, 3, 16, 16), 1, ((1, 1), (2, -1)))
  assert not conv_kernel.supports_forward(x, (3, 3, 16, 16), 1, ((-1, 0), (1, 1)))
  assert not conv_kernel.supports_forward(jnp.ones((2, 1, 4, 16)), (5, 3, 16, 16), 1, pad)
  assert not conv_kernel.supports_forward(x, (3, 3, 16, 16), 2, pad)  # grouped
  assert not conv_kernel.supports_forward(x, (3, 3, 16, 24), 1, pad)  # 24 outputs
  assert not conv_kernel.supports_forward(x.astype(jnp.bfloat16), (3, 3, 16, 16), 1, pad)
  with conv.using('auto'):  # negative padding: XLA's convolution, the same numbers
    w = jnp.asarray(np.random.default_rng(12).normal(size=(3, 3, 16, 16)), jnp.float32)
    xs = jnp.asarray(np.random.default_rng(13).normal(size=(2, 6, 6, 16)), jnp.float32)
    got = conv.conv_general_dilated(xs, w, (1, 1), ((1, 1), (2, -1)), dimension_numbers=conv.NHWC)
  want = conv._xla_conv(xs, w, (1, 1), ((1, 1), (2, -1)), 1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_the_input_gradient_kernel_takes_stride_1_within_the_kernel_size_only():
  dy = jnp.ones((2, 4, 4, 16))
  assert conv_kernel.supports_input_gradient(dy, (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), 1)
  assert not conv_kernel.supports_input_gradient(dy, (3, 3, 16, 16), (2, 2), ((1, 1), (1, 1)), 1)
  assert not conv_kernel.supports_input_gradient(dy, (3, 3, 16, 16), (1, 1), ((3, 0), (1, 1)), 1)
  assert not conv_kernel.supports_input_gradient(dy, (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), 1)


def test_the_weight_gradient_kernel_is_deterministic():
  """Its threads take fixed groups of images, added in order: equal bits on every call."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(16, 16, 16, 32)).astype(np.float32))
  dy = jnp.asarray(rng.normal(size=(16, 16, 16, 32)).astype(np.float32))
  fn = jax.jit(
      lambda x, dy: conv_kernel.weight_gradient(x, dy, (3, 3, 32, 32), (1, 1), ((1, 1),) * 2)
  )
  first = np.asarray(fn(x, dy))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(fn(x, dy)), first)


def _forward_program(kernel_shape, platform='cpu', dtype=jnp.float32):
  x = jnp.ones((2, 6, 6, kernel_shape[2]), dtype)
  w = jnp.ones(kernel_shape, dtype)
  fn = lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC
  )
  with conv.using('auto'):
    if platform == 'cpu':
      return jax.jit(fn).lower(x, w).compile().as_text()
    return jax.jit(fn).trace(x, w).lower(lowering_platforms=(platform,)).as_text()


def test_auto_uses_the_forward_kernel_where_it_applies_and_xla_elsewhere(monkeypatch):
  assert conv_kernel.FORWARD_TARGET in _forward_program((3, 3, 16, 16))
  assert conv_kernel.FORWARD_TARGET in _forward_program((1, 1, 128, 128))
  for kernel_shape in ((3, 3, 3, 16), (3, 3, 256, 256), (3, 3, 16, 24)):  # stem, big, odd
    assert conv_kernel.FORWARD_TARGET not in _forward_program(kernel_shape), kernel_shape
  assert conv_kernel.FORWARD_TARGET not in _forward_program((3, 3, 16, 16), dtype=jnp.bfloat16)
  assert conv_kernel.FORWARD_TARGET not in _forward_program((3, 3, 16, 16), 'cuda')
  with conv.using('xla'):
    fn = lambda x, w: conv.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC
    )
    program = jax.jit(fn).lower(jnp.ones((2, 6, 6, 16)), jnp.ones((3, 3, 16, 16))).as_text()
  assert conv_kernel.FORWARD_TARGET not in program
  monkeypatch.setattr(conv_kernel, 'available', lambda: False)  # no compiler: XLA's
  assert conv_kernel.FORWARD_TARGET not in _forward_program((3, 3, 16, 16))


def _weight_grad_hlo(kernel_shape, monkeypatch=None):
  x = jnp.ones((2, 6, 6, kernel_shape[2]))
  loss = lambda w: jnp.sum(
      conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC) ** 2
  )
  with conv.using('auto'):
    return jax.jit(jax.grad(loss)).lower(jnp.ones(kernel_shape)).compile().as_text()


def test_auto_uses_the_kernel_where_it_applies_and_xla_elsewhere(monkeypatch):
  assert conv_kernel.TARGET in _weight_grad_hlo((3, 3, 16, 16))
  # the forward and the input gradient: two calls of the direct convolution
  x = jnp.ones((2, 6, 6, 16))
  loss = lambda x, w: jnp.sum(
      conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC) ** 2
  )
  with conv.using('auto'):
    program = jax.jit(jax.grad(loss)).lower(x, jnp.ones((3, 3, 16, 16))).compile().as_text()
  assert program.count(f'custom_call_target="{conv_kernel.FORWARD_TARGET}"') == 2
  assert conv_kernel.TARGET not in _weight_grad_hlo((3, 3, 3, 16))  # the stem: 3 channels
  assert conv_kernel.TARGET in _weight_grad_hlo((3, 3, 128, 256))
  assert conv_kernel.TARGET not in _weight_grad_hlo((3, 3, 256, 256))  # XLA's is as fast
  assert conv_kernel.TARGET not in _weight_grad_program('auto', 'cuda')
  monkeypatch.setattr(conv_kernel, 'available', lambda: False)  # no compiler: XLA's
  assert conv_kernel.TARGET not in _weight_grad_hlo((3, 3, 16, 16))


def test_the_kernel_under_shard_map_sums_the_per_device_gradients():
  """Each device's custom call sees its own examples; the kernel gradient must be marked as a
  per-device partial sum so that match_cotangent adds the devices' (different) parts."""
  args = ((4, 6, 6, 16), (3, 3, 16, 16), (1, 1), 9)
  got, program = _sharded_kernel_gradient('auto', *args)
  want, xla_program = _sharded_kernel_gradient('xla', *args)
  assert conv_kernel.TARGET in program and conv_kernel.TARGET not in xla_program
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_without_a_compiler_or_with_a_failing_build_the_kernel_is_off(monkeypatch, tmp_path):
  monkeypatch.setenv('FFKD_JAX_CACHE', str(tmp_path))
  try:
    for compiler in (None, shutil.which('false')):
      monkeypatch.setattr(conv_kernel, '_compiler', lambda compiler=compiler: compiler)
      conv_kernel.available.cache_clear()
      assert not conv_kernel.available()
      assert not list(tmp_path.iterdir())  # no partial library left behind
  finally:
    monkeypatch.undo()
    conv_kernel.available.cache_clear()
  assert conv_kernel.available()  # the real one again (from its cache)
