"""ReviewKD (ffkd_jax/methods/reviewkd.py): its levels and ABF chain against mdistiller's, the
warm-up, the defaults. The 2-step runs on 2 devices and 1 == 4 devices are in test_methods.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar100_distill
from ffkd_jax import methods, models
from ffkd_jax.methods import reviewkd as reviewkd_method
from ffkd_jax.states import feature_shapes_of
from tests import helpers
from tests.test_methods import method_config, two_device_run


def _maps(sizes_and_channels, embedding, preact=True):
  """A role's feature shapes: stage{i} (and stage{i}_preact) maps, then the embedding."""
  shapes = {}
  for i, (hw, c) in enumerate(sizes_and_channels, start=1):
    hw = hw if isinstance(hw, tuple) else (hw, hw)
    shapes[f'stage{i}'] = jax.ShapeDtypeStruct((2, *hw, c), jnp.float32)
    if preact:
      shapes[f'stage{i}_preact'] = jax.ShapeDtypeStruct((2, *hw, c), jnp.float32)
  shapes['embedding'] = jax.ShapeDtypeStruct((2, embedding), jnp.float32)
  return shapes


def _method(teacher, student, **overrides):
  config = method_config('reviewkd')
  for key, value in overrides.items():
    config.reviewkd[key] = value
  return methods.create_method(config, {'teacher': teacher, 'student': student})


def test_levels_of_resnet32x4_to_resnet8x4_are_mdistillers_cfg():
  """CFG.REVIEWKD's hand-set lists (the resnet32x4 -> resnet8x4 pair) from the feature shapes:
  IN_CHANNELS = OUT_CHANNELS [64, 128, 256, 256], SHAPES = OUT_SHAPES [1, 8, 16, 32] deepest
  first; mid channel min(512, 256); the teacher's pre-activation maps as targets."""
  config = cifar100_distill.get_config('reviewkd')
  backbones = {r.name: models.create_model(r.model, 100) for r in methods.method_roles(config)}
  shapes = feature_shapes_of(backbones, 32)
  method = methods.create_method(config, shapes)
  assert method.layer_pairs == (('stage1', 'stage1'), ('stage2', 'stage2'), ('stage3', 'stage3'))
  sources = [source for _, source, _, _ in method.levels]
  targets = [target for _, _, target, _ in method.levels]
  assert sources == ['stage1', 'stage2', 'stage3', 'embedding']
  assert targets == ['stage1_preact', 'stage2_preact', 'stage3_preact', 'embedding']
  in_channels = [shapes['student'][s].shape[-1] for s in sources]
  out_channels = [shape[-1] for _, _, _, shape in method.levels]
  student_sizes = [1 if s == 'embedding' else shapes['student'][s].shape[1] for s in sources]
  out_sizes = [shape[0] for _, _, _, shape in method.levels]
  assert in_channels == out_channels == [64, 128, 256, 256]
  assert student_sizes[::-1] == out_sizes[::-1] == [1, 8, 16, 32]
  assert method.mid_channels == 256
  c = config.reviewkd
  assert (c.ce_weight, c.reviewkd_weight, c.warmup_steps) == (1.0, 5.0, 20 * 782)
  assert (c.student_preact, c.max_mid_channels, c.layer_pairs) == (False, 512, 'auto')
  assert method.required_features() == {'teacher': tuple(targets), 'student': tuple(sources)}


def test_pairs_align_at_the_deepest_stage_and_preact_students():
  teacher = _maps([(32, 16), (16, 32), (8, 64)], 64)
  student = _maps([(16, 12), (8, 16), (4, 48), (2, 160)], 1280)
  method = _method(teacher, student, student_preact=True)
  assert method.layer_pairs == (('stage1', 'stage2'), ('stage2', 'stage3'), ('stage3', 'stage4'))
  assert [source for _, source, _, _ in method.levels] == [
      'stage2_preact',
      'stage3_preact',
      'stage4_preact',
      'embedding',
  ]
  assert [shape for _, _, _, shape in method.levels] == [
      (32, 32, 16),
      (16, 16, 32),
      (8, 8, 64),
      (1, 1, 64),
  ]
  assert method.mid_channels == 512  # min(512, 1280)
  assert _method(teacher, student, max_mid_channels=32).mid_channels == 32


@pytest.mark.parametrize(
    'pairs, match',
    [
        ('stage2:stage2,stage1:stage1', 'from shallow to deep'),
        ('stage1:stage1,embedding:stage2', 'from shallow to deep'),
        ('stage1:stage2', r'stage1:stage2: the student map stage2 is 4x2'),
    ],
)
def test_pairs_the_chain_cannot_fuse_name_the_field(pairs, match):
  teacher = _maps([(8, 4), (4, 8)], 8)
  student = _maps([(8, 4), ((4, 2), 8)], 8)
  with pytest.raises(ValueError, match=rf'config\.reviewkd\.layer_pairs.*{match}'):
    _method(teacher, student, layer_pairs=pairs)


def test_a_teacher_without_preactivation_maps_is_refused():
  teacher = _maps([(8, 4), (4, 8)], 8, preact=False)
  student = _maps([(8, 4), (4, 8)], 8)
  with pytest.raises(ValueError, match=r"reviewkd\.layer_pairs stage1:stage1.*'stage1_preact'"):
    _method(teacher, student)


def test_warmup_is_per_step():
  roles = ('teacher', 'student')
  method = methods.create_method(
      cifar100_distill.get_config('reviewkd'),
      feature_shapes_of({role: models.create_model('resnet8', 10) for role in roles}, 16),
  )
  assert float(method.warmup(jnp.int32(0))) == pytest.approx(1 / 15640)
  assert float(method.warmup(jnp.int32(7819))) == pytest.approx(0.5)
  assert float(method.warmup(jnp.int32(15639))) == 1.0
  assert float(method.warmup(jnp.int32(10**6))) == 1.0


def test_two_steps_ramp_the_hcl_in_and_every_level_has_an_abf():
  """method_config sets warmup_steps = 2: half the HCL at step 0, all of it from step 1."""
  _, states, (first, second) = two_device_run('reviewkd')
  assert first['reviewkd/warmup'] == 0.5 and second['reviewkd/warmup'] == 1.0
  assert first['loss/student_hcl'] > 0
  weight = method_config('reviewkd').reviewkd.reviewkd_weight
  np.testing.assert_allclose(
      first['loss/student'],
      first['loss/student_ce'] + weight * 0.5 * first['loss/student_hcl'],
      rtol=1e-5,
  )
  heads = states[0].roles['student'].params['heads']
  assert sorted(heads) == [
      'abf_embedding-embedding',
      'abf_stage1-stage1',
      'abf_stage2-stage2',
      'abf_stage3-stage3',
  ]
  assert 'att_conv' not in heads['abf_embedding-embedding']  # the deepest level fuses nothing
  assert sorted(heads['abf_stage1-stage1']) == ['att_conv', 'bn1', 'bn2', 'conv1', 'conv2']
  assert sorted(heads['abf_stage1-stage1']['conv1']) == ['kernel']  # no bias
  assert sorted(heads['abf_stage1-stage1']['att_conv']) == ['bias', 'kernel']


def test_initialisation_follows_the_code():
  """conv1 / conv2: kaiming_uniform_(a=1), U(+-sqrt(3 / fan_in)); att_conv: PyTorch's Conv2d
  default, kernel and bias U(+-1 / sqrt(fan_in))."""
  method = _method(_maps([(8, 64), (4, 64)], 64), _maps([(8, 64), (4, 64)], 64))
  heads = method.heads('student')
  features = {k: jnp.zeros(v.shape, v.dtype) for k, v in _maps([(8, 64), (4, 64)], 64).items()}
  params = heads.init(jax.random.key(0), features, train=False)['params']['abf_stage1-stage1']
  conv1 = np.asarray(params['conv1']['kernel'])  # fan_in 64
  conv2 = np.asarray(params['conv2']['kernel'])  # fan_in 9 x 64
  att = np.asarray(params['att_conv']['kernel'])  # fan_in 128
  bias = np.asarray(params['att_conv']['bias'])
  for kernel, bound in ((conv1, np.sqrt(3 / 64)), (conv2, np.sqrt(3 / 576))):
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.1)
  assert np.abs(att).max() <= 1 / np.sqrt(128) and np.abs(bias).max() <= 1 / np.sqrt(128)
  assert np.any(bias != 0)


def test_nearest_resize_repeats_and_subsamples():
  x = jnp.arange(2 * 3 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 3, 1)
  up = reviewkd_method.nearest_resize(x, (6, 6))
  np.testing.assert_array_equal(up, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
  y = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
  np.testing.assert_array_equal(reviewkd_method.nearest_resize(y, (4, 4)), y[:, ::2, ::2])
  assert reviewkd_method.nearest_resize(y, (8, 8)) is y


# ---- against mdistiller's ABF, in PyTorch ------------------------------------------------------


def _torch_reference(torch):
  """A PyTorch transcription of mdistiller/distillers/ReviewKD.py's ABF and of the chain in
  ReviewKD.forward_train (NCHW)."""
  from torch import nn as tnn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class TorchABF(tnn.Module):

    def __init__(self, in_channel, mid_channel, out_channel, fuse):
      super().__init__()
      self.conv1 = tnn.Sequential(
          tnn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
          tnn.BatchNorm2d(mid_channel),
      )
      self.conv2 = tnn.Sequential(
          tnn.Conv2d(mid_channel, out_channel, kernel_size=3, padding=1, bias=False),
          tnn.BatchNorm2d(out_channel),
      )
      self.att_conv = (
          tnn.Sequential(tnn.Conv2d(2 * mid_channel, 2, kernel_size=1), tnn.Sigmoid())
          if fuse
          else None
      )

    def forward(self, x, y=None, shape=None, out_shape=None):
      n, _, h, w = x.shape
      x = self.conv1(x)
      if self.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode='nearest')
        z = self.att_conv(torch.cat([x, y], dim=1))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
      if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode='nearest')
      return self.conv2(x), x

  def chain(abfs, features, shapes, out_shapes):
    """features shallow to deep (the pooled vector last, as (n, d, 1, 1)); abfs, shapes and
    out_shapes deepest first, as the code's lists. Returns the fused maps shallow to deep."""
    x = features[::-1]
    out, res = abfs[0](x[0], out_shape=out_shapes[0])
    results = [out]
    for feat, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
      out, res = abf(feat, res, shape, out_shape)
      results.insert(0, out)
    return results

  return TorchABF, chain


def _copy_into_torch(torch, abf, params, stats):
  """Flax ABF variables -> the PyTorch ABF (kernels (kh, kw, in, out) -> (out, in, kh, kw))."""
  with torch.no_grad():
    abf.conv1[0].weight.copy_(
        torch.tensor(np.asarray(params['conv1']['kernel']).transpose(3, 2, 0, 1))
    )
    abf.conv2[0].weight.copy_(
        torch.tensor(np.asarray(params['conv2']['kernel']).transpose(3, 2, 0, 1))
    )
    for bn, name in ((abf.conv1[1], 'bn1'), (abf.conv2[1], 'bn2')):
      bn.weight.copy_(torch.tensor(np.asarray(params[name]['scale'])))
      bn.bias.copy_(torch.tensor(np.asarray(params[name]['bias'])))
      bn.running_mean.copy_(torch.tensor(np.asarray(stats[name]['mean'])))
      bn.running_var.copy_(torch.tensor(np.asarray(stats[name]['var'])))
    if abf.att_conv is not None:
      conv = abf.att_conv[0]
      conv.weight.copy_(
          torch.tensor(np.asarray(params['att_conv']['kernel']).transpose(3, 2, 0, 1))
      )
      conv.bias.copy_(torch.tensor(np.asarray(params['att_conv']['bias'])))


@pytest.mark.slow
@pytest.mark.parametrize(
    'teacher_sizes',
    [(8, 4, 2), (16, 8, 4), (4, 2, 1), (12, 6, 3)],
    ids=['same', 'teacher-larger', 'teacher-smaller', 'uneven'],
)
def test_abf_chain_matches_mdistiller(teacher_sizes):
  """The whole student side (every level's fused map) against the PyTorch transcription with the
  same weights: in training mode (batch statistics) and in inference mode (running statistics,
  randomised and copied)."""
  torch = pytest.importorskip('torch')
  TorchABF, chain = _torch_reference(torch)
  student_sizes, student_channels, embedding = (8, 4, 2), (4, 6, 8), 10
  teacher_channels, teacher_embedding = (5, 7, 9), 12
  student = _maps(list(zip(student_sizes, student_channels)), embedding)
  teacher = _maps(list(zip(teacher_sizes, teacher_channels)), teacher_embedding)
  method = _method(teacher, student)
  heads = reviewkd_method.ReviewKDHeads(
      tuple((key, source, shape) for key, source, _, shape in method.levels),
      method.mid_channels,
      axis_name=None,
  )
  rng = np.random.default_rng(7)
  n = 4
  inputs = {
      name: rng.normal(size=(n,) + shape.shape[1:]).astype(np.float32)
      for name, shape in student.items()
  }
  variables = heads.init(jax.random.key(1), {k: jnp.asarray(v) for k, v in inputs.items()}, False)
  # Batch norm: random affine parameters and running statistics, so that nothing is an identity.
  params = jax.tree.map(np.asarray, variables['params'])
  stats = jax.tree.map(np.asarray, variables['batch_stats'])
  for level in params.values():
    for name in ('bn1', 'bn2'):
      level[name]['scale'] = rng.uniform(0.5, 1.5, level[name]['scale'].shape).astype(np.float32)
      level[name]['bias'] = rng.uniform(-0.5, 0.5, level[name]['bias'].shape).astype(np.float32)
  for level in stats.values():
    for name in ('bn1', 'bn2'):
      level[name]['mean'] = rng.normal(size=level[name]['mean'].shape).astype(np.float32)
      level[name]['var'] = rng.uniform(0.5, 2.0, level[name]['var'].shape).astype(np.float32)

  # The code's lists: ABFs built shallow to deep (the last without fusion), then reversed.
  in_channels = list(student_channels) + [embedding]
  out_channels = list(teacher_channels) + [teacher_embedding]
  mid = min(512, in_channels[-1])
  assert method.mid_channels == mid
  abfs = [
      TorchABF(c_in, mid, c_out, idx < len(in_channels) - 1)
      for idx, (c_in, c_out) in enumerate(zip(in_channels, out_channels))
  ][::-1]
  keys = [key for key, _, _, _ in method.levels][::-1]
  for abf, key in zip(abfs, keys):
    _copy_into_torch(torch, abf, params[f'abf_{key}'], stats[f'abf_{key}'])
  shapes = [1] + list(student_sizes[::-1])
  out_shapes = [1] + list(teacher_sizes[::-1])
  features = [torch.tensor(inputs[f'stage{i}'].transpose(0, 3, 1, 2)) for i in (1, 2, 3)] + [
      torch.tensor(inputs['embedding'])[:, :, None, None]
  ]

  flax_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  for train in (False, True):  # inference first: a training-mode pass updates torch's statistics
    for abf in abfs:
      abf.train(train)
    with torch.no_grad():
      want = chain(abfs, features, shapes, out_shapes)
    got = heads.apply(
        {'params': params, 'batch_stats': stats},
        flax_inputs,
        train=train,
        mutable=['batch_stats'] if train else False,
    )
    got = got[0] if train else got
    for (key, _, _, shape), expected in zip(method.levels, want):
      expected = expected.numpy().transpose(0, 2, 3, 1)
      assert got[key].shape == (n,) + shape == expected.shape
      np.testing.assert_allclose(got[key], expected, rtol=2e-4, atol=2e-5, err_msg=f'{key} {train}')


@pytest.mark.slow
def test_nearest_resize_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(8)
  for size, out in ((2, 8), (3, 5), (5, 3), (7, 4), (8, 2), (16, 32), (4, 4), (1, 3)):
    x = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    want = F.interpolate(torch.tensor(x), (out, out), mode='nearest').numpy()
    got = reviewkd_method.nearest_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (out, out))
    np.testing.assert_array_equal(np.asarray(got), want.transpose(0, 2, 3, 1), err_msg=f'{size}')


def test_heads_read_the_student_only():
  method, _, _ = helpers.build(method_config('reviewkd'))
  assert method.heads('teacher') is None and method.heads('student') is not None
