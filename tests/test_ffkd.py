"""FFKD against a NumPy transcription of wp502/SKD-RSL (zoo/Our_1.py, zoo/CKA.py, zoo/KD.py and
train_one_epoch.py::train_our_distill), and its regressors against PyTorch's ConvReg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ffkd_jax.losses import ffkd as ffkd_losses
from ffkd_jax.methods.base import RoleOutput
from ffkd_jax.methods.connectors import Regressor
from ffkd_jax.methods.pairs import pair_key
from tests import helpers

# ---- The reference, transcribed (NCHW, as there) -------------------------------------------


def np_linear_cka(x, y):
  """zoo/CKA.py linear_CKA: centred Gram matrices H K H, HSIC = sum of their products."""
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n

  def hsic(a, b):
    return np.sum((h @ (a @ a.T) @ h) * (h @ (b @ b.T) @ h))

  return hsic(x, y) / (np.sqrt(hsic(x, x)) * np.sqrt(hsic(y, y)))


def np_log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_distill_kl(y_s, y_t, T):
  """zoo/KD.py DistillKL(y_s, y_t): KL(p_t || p_s) * T^2 / batch."""
  p_t = np.exp(np_log_softmax(y_t / T))
  return np.sum(p_t * (np.log(p_t) - np_log_softmax(y_s / T))) * T * T / y_s.shape[0]


def np_cross_entropy(logits, labels):
  return -np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels])


def np_our_loss(feat_t, feat_s, regressed, T, is_100cka, use_cka, is_feedback):
  """OurLoss.forward: CKA of the raw maps (x100 optionally), channel KL of the regressed ones,
  then the CKA-weighted sum (forward) or the sum over CKA <= mean (feedback)."""
  scores, losses = [], []
  for t, s, r in zip(feat_t, feat_s, regressed):
    n, c = t.shape[:2]
    score = np_linear_cka(t.reshape(n, -1), s.reshape(n, -1)) * (100.0 if is_100cka else 1.0)
    scores.append(score)
    r_temp, t_temp = (r / T).reshape(n, c, -1), (t / T).reshape(n, c, -1)
    if is_feedback:  # KLDivLoss(log_softmax(t), softmax(s)): KL(q(s) || q(t))
      target, log_input = np.exp(np_log_softmax(r_temp)), np_log_softmax(t_temp)
    else:
      target, log_input = np.exp(np_log_softmax(t_temp)), np_log_softmax(r_temp)
    losses.append(np.sum(target * (np.log(target) - log_input)) * T * T / (n * c))
  if is_feedback:
    mean = np.mean(scores)
    return sum(l for cka, l in zip(scores, losses) if (cka <= mean or not use_cka))
  return sum((cka if use_cka else 1.0) * l for cka, l in zip(scores, losses))


# ---- The method against it -----------------------------------------------------------------


def _random_outputs(method, rng, n=12):
  """RoleOutputs of random positive (post-ReLU-like) maps of the method's feature shapes, with
  random regressed maps as both roles' heads."""
  outputs, nchw = {}, {}
  for role in ('teacher', 'student'):
    shapes = method.feature_shapes[role]
    features = {
        name: np.abs(rng.normal(size=(n, *shape.shape[1:]))).astype(np.float32)
        for name, shape in shapes.items()
    }
    heads = {
        pair_key((t, s)): np.abs(
            rng.normal(size=(n, *method.feature_shapes['teacher'][t].shape[1:]))
        ).astype(np.float32)
        for t, s in method.layer_pairs
    }
    logits = rng.normal(size=(n, helpers.NUM_CLASSES)).astype(np.float32) * 3
    outputs[role] = RoleOutput(logits, features, heads)
    maps = {k: v for k, v in {**features, **heads}.items() if v.ndim == 4}
    nchw[role] = {k: np.transpose(v, (0, 3, 1, 2)) for k, v in maps.items()}
  return outputs, nchw


def _as_tree(outputs):
  return {role: (o.logits, dict(o.features), dict(o.heads)) for role, o in outputs.items()}


def _as_outputs(tree):
  return {role: RoleOutput(*parts) for role, parts in tree.items()}


@pytest.mark.parametrize('preset', ['fkd', 'fkd_cka', 'fkd_fbkd', 'ffkd'])
@pytest.mark.parametrize('cka_x100', [False, True])
def test_phase_losses_match_the_reference(preset, cka_x100):
  config = helpers.tiny_config(preset)
  c = config.ffkd
  c.cka_x100 = cka_x100
  c.alpha, c.beta_fwd, c.gamma_fwd, c.beta_fdbk, c.gamma_fdbk = 0.7, 1.3, 2.0, 0.4, 3.0
  method, _, _ = helpers.build(config)
  rng = np.random.default_rng(0)
  outputs, nchw = _random_outputs(method, rng)
  labels = rng.integers(0, helpers.NUM_CLASSES, size=12).astype(np.int32)
  mesh = helpers.mesh_of(1)

  def run(loss_fn):
    fn = lambda o, y: jax.lax.pmean(loss_fn(_as_outputs(o), y, jnp.int32(0)), 'data')
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P('data'), P('data')), out_specs=P()))(
        _as_tree(outputs), labels
    )

  switches, T = method.switches, c.temperature
  feat_t = [nchw['teacher'][t] for t, _ in method.layer_pairs]
  feat_s = [nchw['student'][s] for _, s in method.layer_pairs]
  keys = [pair_key(p) for p in method.layer_pairs]
  z_t, z_s = outputs['teacher'].logits, outputs['student'].logits

  # Student: alpha CE + beta_fwd KD + gamma_fwd OurLoss(forward) (train_our_distill, loss_fwd).
  want = c.alpha * np_cross_entropy(z_s, labels) + c.beta_fwd * np_distill_kl(z_s, z_t, T)
  if switches.channel_loss:
    regressed = [nchw['student'][k] for k in keys]
    want += c.gamma_fwd * np_our_loss(
        feat_t, feat_s, regressed, T, cka_x100, switches.forward_cka, is_feedback=False
    )
  losses, _ = run(method.student_loss)
  np.testing.assert_allclose(float(losses['student']), want, rtol=2e-5)

  if not switches.feedback:
    assert len(method.phases()) == 1
    return
  # Teacher: alpha CE + beta_fdbk KD(z_t, z_s) + gamma_fdbk OurLoss(feedback) (loss_fdbk).
  want = c.alpha * np_cross_entropy(z_t, labels) + c.beta_fdbk * np_distill_kl(z_t, z_s, T)
  regressed = [nchw['teacher'][k] for k in keys]
  want += c.gamma_fdbk * np_our_loss(
      feat_t, feat_s, regressed, T, cka_x100, switches.feedback_cka, is_feedback=True
  )
  losses, _ = run(method.teacher_loss)
  np.testing.assert_allclose(float(losses['teacher']), want, rtol=2e-5)


def test_stage_terms_against_the_reference_aggregation():
  """forward_channel_loss / feedback_channel_loss on given CKAs and losses, and the selection."""
  scores = np.array([0.9, 0.3, 0.6, 0.2], np.float32)
  stage_losses = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
  assert float(ffkd_losses.forward_channel_loss(scores, stage_losses)) == pytest.approx(
      0.9 + 0.6 + 2.4 + 1.6
  )
  assert float(ffkd_losses.forward_channel_loss(scores, stage_losses, weighted=False)) == 15.0
  # mean 0.5: stages 1 and 3 (0.3, 0.2) are selected
  assert float(ffkd_losses.feedback_channel_loss(scores, stage_losses)) == 10.0
  assert float(ffkd_losses.feedback_channel_loss(scores, stage_losses, selected=False)) == 15.0
  np.testing.assert_array_equal(ffkd_losses.feedback_selection(scores), [0, 1, 0, 1])
  equal = np.full(3, 0.5, np.float32)  # all equal the mean: all selected
  np.testing.assert_array_equal(ffkd_losses.feedback_selection(equal), [1, 1, 1])
  with pytest.raises(ValueError, match='one CKA and one channel loss per stage'):
    ffkd_losses.forward_channel_loss(scores, stage_losses[:2])


def test_gradients_reach_what_the_code_trains():
  """Student phase: no gradient to the teacher's maps or logits, none through the CKA weights.
  Teacher phase: gradient to the teacher's maps and logits; none to the student's."""
  config = helpers.tiny_config('ffkd')
  method, _, _ = helpers.build(config)
  rng = np.random.default_rng(1)
  outputs, _ = _random_outputs(method, rng)
  labels = rng.integers(0, helpers.NUM_CLASSES, size=12).astype(np.int32)
  mesh = helpers.mesh_of(1)

  def grads(loss_fn, role):
    def total(o, y):
      return loss_fn(_as_outputs(o), y, jnp.int32(0))[0][role]

    fn = jax.grad(total)
    g = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P('data'), P('data')), out_specs=P('data')))(
        _as_tree(outputs), labels
    )
    return _as_outputs(g)

  def norm(tree):
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))

  g = grads(method.student_loss, 'student')
  assert norm(g['teacher'].logits) == 0 and norm(g['teacher'].features) == 0
  assert norm(g['student'].logits) > 0 and norm(g['student'].heads) > 0
  # The CKA weight is on the raw student maps, stop-gradient: they get no gradient at all.
  assert norm(g['student'].features) == 0
  g = grads(method.teacher_loss, 'teacher')
  assert norm(g['teacher'].logits) > 0 and norm(g['teacher'].features) > 0
  assert norm(g['teacher'].heads) > 0  # R_fb(sg(V)) is the KL's target: R_fb learns
  assert norm(g['student'].logits) == 0 and norm(g['student'].features) == 0


# ---- The regressors against ConvReg ---------------------------------------------------------


@pytest.mark.parametrize(
    'student_hw,teacher_hw',
    [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((6, 6), (4, 4)), ((4, 4), (4, 4))],
)
def test_regressor_matches_convreg(student_hw, teacher_hw):
  """Regressor = zoo/Our_1.py ConvReg (conv by the sizes, BatchNorm2d, ReLU) with the same
  weights, in training mode (batch statistics) and in inference mode (running statistics; the
  running mean is compared, and the running variance copied over, since Flax keeps the biased
  variance where PyTorch keeps the unbiased one)."""
  torch = pytest.importorskip('torch')
  from torch import nn as tnn  # pylint: disable=g-import-not-at-top

  c_s, c_t, n = 3, 5, 4
  (h_s, w_s), (h_t, w_t) = student_hw, teacher_hw
  if h_s == 2 * h_t:
    conv = tnn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # (kh, kw, in, out)
  elif 2 * h_s == h_t:
    conv = tnn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    kernel = (
        conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    )  # (in, out, ..) -> (kh, kw, out, in)
  else:
    conv = tnn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  bn = tnn.BatchNorm2d(c_t)
  with torch.no_grad():
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.5, 0.5)
  x = np.random.default_rng(2).normal(size=(n, c_s, h_s, w_s)).astype(np.float32)

  module = Regressor((h_t, w_t, c_t))
  x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  variables = module.init(jax.random.key(0), x_nhwc, train=False)
  params = {
      'conv': {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(conv.bias.detach().numpy())},
      'bn': {
          'scale': jnp.asarray(bn.weight.detach().numpy()),
          'bias': jnp.asarray(bn.bias.detach().numpy()),
      },
  }
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, variables['params'])
  y_train, updated = module.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x_nhwc,
      train=True,
      mutable=['batch_stats'],
  )
  reference = lambda: torch.relu(bn(conv(torch.from_numpy(x)))).detach().numpy()
  bn.train()
  want_train = reference()
  np.testing.assert_allclose(np.asarray(y_train).transpose(0, 3, 1, 2), want_train, atol=1e-5)
  # One update of the running statistics, PyTorch's momentum 0.1 (unbiased variance there).
  bn.eval()
  y_eval = module.apply({'params': params, **updated}, x_nhwc, train=False)
  mean_gap = np.abs(np.asarray(updated['batch_stats']['bn']['mean']) - bn.running_mean.numpy())
  assert mean_gap.max() < 1e-5
  if n * h_t * w_t > 1:  # flax keeps the biased variance: compare through its own statistics
    var = np.asarray(updated['batch_stats']['bn']['var'])
    with torch.no_grad():
      bn.running_var.copy_(torch.from_numpy(np.array(var)))
  np.testing.assert_allclose(np.asarray(y_eval).transpose(0, 3, 1, 2), reference(), atol=1e-5)


def test_regressor_refuses_a_smaller_student_map():
  module = Regressor((8, 8, 4))
  with pytest.raises(ValueError, match='neither twice nor half'):
    module.init(jax.random.key(0), jnp.zeros((2, 6, 6, 3)), train=False)


def test_feedback_regressors_read_the_students_maps():
  """R_fb are the teacher's heads but read the student's maps (widths differ here: resnet8x4
  teacher, resnet8 student): their kernels map student channels to teacher channels, and in the
  step their output is a Regressor applied to the student's features."""
  from ffkd_jax import step as step_lib  # pylint: disable=g-import-not-at-top

  config = helpers.tiny_config('ffkd', model='resnet8', teacher='resnet8x4')
  method, programs, state = helpers.build(config)
  assert programs['teacher'].heads_source == 'student'
  student_shapes = method.feature_shapes['student']
  teacher_shapes = method.feature_shapes['teacher']
  images = jnp.asarray(np.random.default_rng(4).normal(size=(4, 16, 16, 3)), jnp.float32)
  params = {n: s.params for n, s in state.roles.items()}
  stats = {n: s.batch_stats for n, s in state.roles.items()}
  outputs, _ = step_lib.forward_roles(programs, params, stats, images, ('teacher', 'student'))
  for t_name, s_name in method.layer_pairs:
    key = pair_key((t_name, s_name))
    kernel = state.roles['teacher'].params['heads'][f'regressor_{key}']['conv']['kernel']
    assert kernel.shape[-2:] == (student_shapes[s_name].shape[-1], teacher_shapes[t_name].shape[-1])
    regressor = Regressor(tuple(teacher_shapes[t_name].shape[1:]))
    variables = {
        'params': state.roles['teacher'].params['heads'][f'regressor_{key}'],
        'batch_stats': state.roles['teacher'].batch_stats['heads'][f'regressor_{key}'],
    }
    want = regressor.apply(variables, outputs['student'].features[s_name], train=False)
    np.testing.assert_allclose(outputs['teacher'].heads[key], want, rtol=1e-5, atol=1e-6)


def test_regressor_kind_needs_both_sides_to_agree():
  from ffkd_jax.methods.connectors import regressor_kind  # pylint: disable=g-import-not-at-top

  assert regressor_kind((8, 8), (4, 4)) == 'stride2'
  assert regressor_kind((4, 4), (8, 8)) == 'transposed'
  assert regressor_kind((6, 5), (4, 4)) == 'valid'
  for student, teacher in (((8, 6), (4, 4)), ((2, 4), (4, 4)), ((3, 3), (4, 4))):
    with pytest.raises(ValueError, match='neither twice nor half'):
      regressor_kind(student, teacher)
