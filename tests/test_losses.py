"""ffkd_jax.losses against independent float64 NumPy computations and defining properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffkd_jax.losses import at, cc, ccs, cd, classification, dist, dkd, ffkd, fitnet, ickd, kdcl
from ffkd_jax.losses import iekd, mutual, reviewkd, rkd, sp

RTOL = 1e-5
ATOL = 1e-6


def np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
  """KL(p || q) for two probability vectors, summed over classes, with a loop."""
  return sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q) if pk > 0)


def np_huber(d):
  d = abs(d)
  return 0.5 * d * d if d < 1.0 else d - 0.5


def rng_for(seed):
  return np.random.default_rng(seed)


# ---- classification -----------------------------------------------------------------------


def test_cross_entropy_against_numpy():
  rng = rng_for(0)
  logits = rng.normal(size=(6, 5)) * 3
  labels = rng.integers(0, 5, size=6)
  expected = np.mean([-math.log(np_softmax(logits[i])[labels[i]]) for i in range(6)])
  np.testing.assert_allclose(classification.cross_entropy(logits, labels), expected, rtol=RTOL)


def test_softened_kl_against_numpy_and_zero_for_equal_logits():
  rng = rng_for(1)
  teacher = rng.normal(size=(5, 7)) * 2
  student = rng.normal(size=(5, 7)) * 2
  tau = 4.0
  expected = tau**2 * np.mean(
      [np_kl(np_softmax(teacher[i] / tau), np_softmax(student[i] / tau)) for i in range(5)]
  )
  np.testing.assert_allclose(classification.softened_kl(teacher, student, tau), expected, rtol=RTOL)
  np.testing.assert_allclose(classification.softened_kl(teacher, teacher, tau), 0.0, atol=1e-6)
  # Per-example constants do not change a softmax.
  shifted = student + rng.normal(size=(5, 1)) * 10
  np.testing.assert_allclose(classification.softened_kl(teacher, shifted, tau), expected, rtol=1e-4)
  grad = jax.grad(classification.softened_kl, argnums=1)(
      jnp.asarray(teacher, jnp.float32), jnp.asarray(teacher, jnp.float32), tau
  )
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)  # a minimum


def test_top_k_correct_against_numpy_and_ties():
  rng = rng_for(2)
  logits = rng.normal(size=(20, 10))
  labels = rng.integers(0, 10, size=20)
  for k in (1, 3):
    order = np.argsort(-logits, axis=1)[:, :k]
    expected = np.array([labels[i] in order[i] for i in range(20)], np.float32)
    np.testing.assert_array_equal(classification.top_k_correct(logits, labels, k), expected)
  constant = np.zeros((4, 10))
  np.testing.assert_array_equal(
      classification.top_k_correct(constant, np.array([0, 1, 2, 0]), 1), [1, 0, 0, 1]
  )


def test_standardize_logits_against_numpy_and_invariances():
  """sunshangquan/logit-standardization-KD's `normalize`: (z - mean) / (1e-7 + std), PyTorch's
  unbiased std over the classes."""
  rng = rng_for(3)
  z = rng.normal(size=(5, 7)) * 4 + 2
  expected = (z - z.mean(axis=-1, keepdims=True)) / (1e-7 + z.std(axis=-1, ddof=1, keepdims=True))
  got = classification.standardize_logits(z)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.std(got, axis=-1, ddof=1), 1.0, rtol=1e-5)
  # A per-example positive scale and shift of the logits changes nothing.
  scale, shift = rng.uniform(0.1, 10.0, size=(5, 1)), rng.normal(size=(5, 1)) * 10
  np.testing.assert_allclose(
      classification.standardize_logits(z * scale + shift), expected, rtol=1e-4, atol=1e-5
  )
  # Constant logits: zeros, finite gradients.
  constant = jnp.ones((2, 4), jnp.float32)
  np.testing.assert_array_equal(classification.standardize_logits(constant), 0.0)
  grad = jax.grad(lambda x: jnp.sum(classification.standardize_logits(x) ** 3))(constant)
  assert np.all(np.isfinite(grad))
  with pytest.raises(ValueError, match='at least 2 classes'):
    classification.standardize_logits(z[:, :1])


# ---- DKD ----------------------------------------------------------------------------------


def np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl_div_sum(input_log_prob, target_prob):
  """PyTorch's F.kl_div(input, target, reduction='sum'): sum of target (log target - input),
  with 0 where target == 0."""
  safe = np.where(target_prob > 0, target_prob, 1.0)
  return np.sum(np.where(target_prob > 0, target_prob * (np.log(safe) - input_log_prob), 0.0))


def np_mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
  """A NumPy transcription of megvii-research/mdistiller, mdistiller/distillers/DKD.py
  `dkd_loss` (its masks, cat_mask, log of the two summed probabilities, the -1000 mask)."""
  n, k = logits_student.shape
  gt_mask = np.zeros((n, k))
  gt_mask[np.arange(n), target] = 1.0
  other_mask = 1.0 - gt_mask

  def cat_mask(t):
    return np.stack([(t * gt_mask).sum(axis=1), (t * other_mask).sum(axis=1)], axis=1)

  pred_student = cat_mask(np_softmax(logits_student / temperature))
  pred_teacher = cat_mask(np_softmax(logits_teacher / temperature))
  tckd = np_kl_div_sum(np.log(pred_student), pred_teacher) * temperature**2 / n
  pred_teacher_part2 = np_softmax(logits_teacher / temperature - 1000.0 * gt_mask)
  log_pred_student_part2 = np_log_softmax(logits_student / temperature - 1000.0 * gt_mask)
  nckd = np_kl_div_sum(log_pred_student_part2, pred_teacher_part2) * temperature**2 / n
  return alpha * tckd + beta * nckd


@pytest.mark.parametrize('alpha, beta, tau', [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.0, 2.0)])
def test_dkd_against_mdistiller(alpha, beta, tau):
  rng = rng_for(30)
  student = rng.normal(size=(6, 7)) * 3
  teacher = rng.normal(size=(6, 7)) * 3
  labels = rng.integers(0, 7, size=6)
  expected = np_mdistiller_dkd(student, teacher, labels, alpha, beta, tau)
  got = dkd.dkd_loss(student, teacher, labels, alpha, beta, tau)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  tckd, nckd = dkd.decoupled_kl(student, teacher, labels, tau)
  np.testing.assert_allclose(alpha * tckd + beta * nckd, expected, rtol=1e-5)


def test_dkd_decomposes_kd_per_example():
  """KD = TCKD + (1 - p_T,y) NCKD for each example (the paper's identity)."""
  rng = rng_for(31)
  student = rng.normal(size=(5, 6)) * 2
  teacher = rng.normal(size=(5, 6)) * 2
  labels = rng.integers(0, 6, size=5)
  tau = 4.0
  for i in range(5):
    s, t, y = student[i : i + 1], teacher[i : i + 1], labels[i : i + 1]
    tckd, nckd = dkd.decoupled_kl(s, t, y, tau)
    p_target = np_softmax(t[0] / tau)[y[0]]
    kd = classification.softened_kl(t, s, tau)
    np.testing.assert_allclose(tckd + (1 - p_target) * nckd, kd, rtol=1e-5)


def test_dkd_is_stable_and_its_gradients_are_sane():
  rng = rng_for(32)
  labels = jnp.asarray([0, 1, 2, 3])
  # Logits so confident that p_y rounds to 1 (mdistiller's log(1 - p_y) would be log 0).
  student = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32) + 1e4 * jax.nn.one_hot(labels, 5)
  teacher = jnp.asarray(rng.normal(size=(4, 5)) * 3, jnp.float32)
  loss_fn = lambda s, t: dkd.dkd_loss(s, t, labels, 1.0, 8.0, 4.0)
  value, (g_student, g_teacher) = jax.value_and_grad(loss_fn, argnums=(0, 1))(student, teacher)
  assert np.isfinite(value) and value > 0
  assert np.all(np.isfinite(g_student)) and np.all(np.isfinite(g_teacher))
  # The teacher is used as given: it gets a gradient unless the caller stops it.
  assert np.any(np.asarray(g_teacher) != 0)
  g_stopped = jax.grad(lambda t: loss_fn(student, jax.lax.stop_gradient(t)))(teacher)
  assert not np.any(np.asarray(g_stopped))
  # A student equal to its teacher is a minimum: zero loss, zero gradient.
  value, grad = jax.value_and_grad(loss_fn)(teacher, teacher)
  np.testing.assert_allclose(value, 0.0, atol=1e-6)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  with pytest.raises(ValueError, match=r'\(4, 5\), \(4, 3\)'):
    dkd.dkd_loss(student, teacher[:, :3], labels, 1.0, 8.0, 4.0)
  with pytest.raises(ValueError, match='at least 2 classes'):
    dkd.dkd_loss(student[:, :1], teacher[:, :1], labels * 0, 1.0, 8.0, 4.0)


# ---- CD (wp502/SKD-RSL zoo/CD.py) ---------------------------------------------------------


def np_cd_loss(stu_features, tea_features):
  """A NumPy transcription of zoo/CD.py's CDLoss.forward on NCHW maps (after each Embed)."""
  loss = 0.0
  for s, t in zip(stu_features, tea_features):
    s = s.mean(axis=(2, 3))
    t = t.mean(axis=(2, 3))
    loss += np.mean((s - t) ** 2)
  return loss


def np_kd_loss_v2(stu_pred, tea_pred, label, T):
  """A NumPy transcription of zoo/CD.py's KDLossv2.forward (guided KD)."""
  s = np_log_softmax(stu_pred / T)
  t = np_softmax(tea_pred / T)
  t_argmax = np.argmax(t, axis=1)
  mask = (label == t_argmax).astype(np.float64)
  count = mask[mask == 1].shape[0]
  mask = mask[:, None]
  correct_s = s * mask
  correct_t = t * mask
  correct_t[correct_t == 0.0] = 1.0
  return np_kl_div_sum(correct_s, correct_t) * T**2 / count


def to_nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def test_channel_distillation_loss_against_skd_rsl():
  rng = rng_for(33)
  # Two stage pairs, NCHW as the reference; spatial sizes differ within a pair.
  students = [rng.normal(size=(4, 6, 4, 4)), rng.normal(size=(4, 3, 2, 2)) * 2]
  teachers = [rng.normal(size=(4, 6, 2, 2)) + 0.5, rng.normal(size=(4, 3, 1, 1))]
  expected = np_cd_loss(students, teachers)
  got = sum(
      cd.channel_distillation_loss(to_nhwc(s), to_nhwc(t)) for s, t in zip(students, teachers)
  )
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  # Only channel means count: a spatial permutation changes nothing.
  s = jnp.asarray(to_nhwc(students[0]), jnp.float32)
  t = jnp.asarray(to_nhwc(teachers[0]), jnp.float32)
  np.testing.assert_allclose(
      cd.channel_distillation_loss(s[:, ::-1, ::-1], t),
      cd.channel_distillation_loss(s, t),
      rtol=1e-6,
  )
  g_s, g_t = jax.grad(cd.channel_distillation_loss, argnums=(0, 1))(s, t)
  assert np.any(np.asarray(g_s) != 0) and np.any(np.asarray(g_t) != 0)
  g_stopped = jax.grad(lambda t: cd.channel_distillation_loss(s, jax.lax.stop_gradient(t)))(t)
  assert not np.any(np.asarray(g_stopped))
  with pytest.raises(ValueError, match='embed the student'):
    cd.channel_distillation_loss(s[..., :2], t)


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_guided_kd_against_skd_rsl(temperature):
  rng = rng_for(34)
  student = rng.normal(size=(10, 5)) * 2
  teacher = rng.normal(size=(10, 5)) * 3
  labels = rng.integers(0, 5, size=10)
  labels[:6] = np.argmax(teacher[:6], axis=1)  # the teacher is right on (at least) 6 examples
  expected = np_kd_loss_v2(student, teacher, labels, temperature)
  loss, metrics = cd.guided_kd_loss(student, teacher, labels, temperature)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['teacher_correct'], np.mean(labels == teacher.argmax(1)))


def test_guided_kd_reads_the_correct_examples_only_and_guards_count_zero():
  rng = rng_for(35)
  student = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(6, 4)) * 3, jnp.float32)
  right = jnp.argmax(teacher, axis=1)
  labels = right.at[3:].set((right[3:] + 1) % 4)  # wrong on examples 3, 4, 5
  loss_fn = lambda s, t, y: cd.guided_kd_loss(s, t, y, 4.0)[0]
  g_student, g_teacher = jax.grad(loss_fn, argnums=(0, 1))(student, teacher, labels)
  assert np.all(np.any(np.asarray(g_student[:3]) != 0, axis=1))
  assert not np.any(np.asarray(g_student[3:]))  # the teacher's mistakes are not imitated
  assert np.any(np.asarray(g_teacher) != 0)  # used as given: the caller stops it
  g_stopped = jax.grad(lambda t: loss_fn(student, jax.lax.stop_gradient(t), labels))(teacher)
  assert not np.any(np.asarray(g_stopped))
  # Equal to KD over the correct examples alone.
  np.testing.assert_allclose(
      loss_fn(student, teacher, labels),
      classification.softened_kl(teacher[:3], student[:3], 4.0),
      rtol=1e-5,
  )
  # The teacher wrong everywhere: the loss is 0 (the reference: 0 / 0), gradients finite.
  all_wrong = (right + 1) % 4
  value, grad = jax.value_and_grad(loss_fn)(student, teacher, all_wrong)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
  assert float(cd.guided_kd_loss(student, teacher, all_wrong, 4.0)[1]['teacher_correct']) == 0.0


# ---- CCS (wp502/SKD-RSL zoo/CCS_2.py) -----------------------------------------------------


def np_euclidean_dist_fm_inter(fm, eps=1e-12):
  """zoo/CCS_2.py euclidean_dist_fm_inter(fm, squared=True) on an NCHW map."""
  n, c = fm.shape[:2]
  fm = fm.reshape(n, c, -1)
  fm_square = (fm**2).sum(axis=2)
  fm_prod = fm @ fm.transpose(0, 2, 1)
  fm_dist = np.maximum(fm_square[:, None, :] + fm_square[:, :, None] - 2 * fm_prod, eps)
  fm_dist = fm_dist.copy()
  fm_dist[:, range(c), range(c)] = 0
  return fm_dist / fm_dist.max()


def np_euclidean_dist_fm_intra(fm, eps=1e-12):
  """zoo/CCS_2.py euclidean_dist_fm_intra(fm, squared=True) on an NCHW map."""
  fm = fm.reshape(fm.shape[0], -1)
  fm_square = (fm**2).sum(axis=1)
  fm_prod = fm @ fm.T
  fm_dist = np.maximum(fm_square[None, :] + fm_square[:, None] - 2 * fm_prod, eps)
  fm_dist = fm_dist.copy()
  fm_dist[range(len(fm)), range(len(fm))] = 0
  return fm_dist / fm_dist.max()


def np_ccs_loss(fm_s1, fm_t1):
  """zoo/CCS_2.py ccs_loss: w_intra mse(intra) + w_inter mse(inter), both weights 1."""
  loss_inter = np.mean((np_euclidean_dist_fm_inter(fm_s1) - np_euclidean_dist_fm_inter(fm_t1)) ** 2)
  loss_intra = np.mean((np_euclidean_dist_fm_intra(fm_s1) - np_euclidean_dist_fm_intra(fm_t1)) ** 2)
  return loss_intra + loss_inter


def test_ccs_against_skd_rsl():
  rng = rng_for(36)
  # Two stage pairs, NCHW as the reference; spatial sizes may differ within a pair.
  students = [rng.normal(size=(5, 4, 3, 3)), rng.normal(size=(5, 6, 2, 2)) * 3 + 1]
  teachers = [rng.normal(size=(5, 4, 2, 2)) * 2, np.abs(rng.normal(size=(5, 6, 2, 2)))]
  expected = sum(np_ccs_loss(s, t) for s, t in zip(students, teachers))
  got = sum(ccs.ccs_loss(to_nhwc(s), to_nhwc(t)) for s, t in zip(students, teachers))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(
      ccs.channel_distances(to_nhwc(students[0])),
      np_euclidean_dist_fm_inter(students[0]),
      rtol=1e-5,
      atol=1e-7,
  )
  np.testing.assert_allclose(
      ccs.example_distances(to_nhwc(students[0])),
      np_euclidean_dist_fm_intra(students[0]),
      rtol=1e-5,
      atol=1e-7,
  )


def test_ccs_invariances_and_gradients():
  rng = rng_for(37)
  s = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 2, 2, 5)), jnp.float32)
  base = ccs.ccs_loss(s, t)
  # One scale for the whole batch (the largest distance) and spatial order do not count.
  np.testing.assert_allclose(ccs.ccs_loss(7.0 * s, t), base, rtol=1e-4)
  np.testing.assert_allclose(ccs.ccs_loss(s[:, ::-1, ::-1], t), base, rtol=1e-5)
  np.testing.assert_allclose(ccs.ccs_loss(s, s), 0.0, atol=1e-7)
  g_s, g_t = jax.grad(ccs.ccs_loss, argnums=(0, 1))(s, t)
  assert np.all(np.isfinite(g_s)) and np.any(np.asarray(g_s) != 0)
  assert np.any(np.asarray(g_t) != 0)
  g_stopped = jax.grad(lambda t: ccs.ccs_loss(s, jax.lax.stop_gradient(t)))(t)
  assert not np.any(np.asarray(g_stopped))
  # Duplicated examples (a clamped zero distance) and a batch of one stay finite.
  duplicated = jnp.concatenate([s[:2], s[:2]])
  value, grad = jax.value_and_grad(ccs.ccs_loss)(duplicated, t)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  value, grad = jax.value_and_grad(ccs.ccs_loss)(s[:1], t[:1])
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(ccs.example_distances(s[:1]), 0.0)
  with pytest.raises(ValueError, match='embed the student'):
    ccs.ccs_loss(s[..., :2], t)


# ---- DIST ---------------------------------------------------------------------------------


def np_dist(z_s, z_t, tau, beta, gamma):
  y_s, y_t = np_softmax(z_s / tau), np_softmax(z_t / tau)
  inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(y_s.shape[0])])
  intra = 1 - np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(y_s.shape[1])])
  return tau**2 * (beta * inter + gamma * intra)


def test_dist_against_numpy_and_invariance():
  dist_loss = jax.jit(dist.dist_loss, static_argnums=(2, 3, 4))
  rng = rng_for(5)
  z_s = rng.normal(size=(8, 6)) * 2
  z_t = z_s + rng.normal(size=(8, 6))
  for tau, beta, gamma in [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)]:
    np.testing.assert_allclose(
        dist_loss(z_s, z_t, tau, beta, gamma), np_dist(z_s, z_t, tau, beta, gamma), rtol=1e-4
    )
  base = dist_loss(z_s, z_t, 4.0)
  np.testing.assert_allclose(
      dist_loss(z_s + rng.normal(size=(8, 1)) * 5, z_t - rng.normal(size=(8, 1)) * 5, 4.0),
      base,
      rtol=1e-4,
  )
  np.testing.assert_allclose(dist_loss(z_t, z_t, 4.0), 0.0, atol=1e-4)
  # Uniform predictions (constant logits) stay finite, gradients too.
  zeros = jnp.zeros((8, 6))
  value, grad = jax.value_and_grad(dist.dist_loss)(zeros, zeros, 4.0)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


# ---- RKD ----------------------------------------------------------------------------------


def np_rkd(s, t):
  n = s.shape[0]

  def distances(e):
    d = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          d[i, j] = np.linalg.norm(e[i] - e[j])
    return d / (d.sum() / (n * (n - 1)))

  def angles(e):
    a = np.zeros((n, n, n))
    for i in range(n):
      for j in range(n):
        for k in range(n):
          if j == i or k == i:
            continue
          u = (e[j] - e[i]) / np.linalg.norm(e[j] - e[i])
          v = (e[k] - e[i]) / np.linalg.norm(e[k] - e[i])
          a[i, j, k] = u @ v
    return a

  ds, dt = distances(s), distances(t)
  as_, at_ = angles(s), angles(t)
  loss_d = np.mean([np_huber(x) for x in (ds - dt).ravel()])
  loss_a = np.mean([np_huber(x) for x in (as_ - at_).ravel()])
  return loss_d, loss_a


def test_rkd_against_numpy_and_invariances():
  rkd_loss = jax.jit(rkd.rkd_loss)
  rng = rng_for(6)
  s = rng.normal(size=(5, 4))
  t = rng.normal(size=(5, 3)) * 3  # the feature sizes may differ
  expected_d, expected_a = np_rkd(s, t)
  loss_d, loss_a = rkd_loss(s, t)
  np.testing.assert_allclose(loss_d, expected_d, rtol=1e-4)
  np.testing.assert_allclose(loss_a, expected_a, rtol=1e-4)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  for transformed in (7.0 * s, s + 3.0, s @ q):  # scale, translation, rotation
    d2, a2 = rkd_loss(transformed, t)
    np.testing.assert_allclose(d2, expected_d, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(a2, expected_a, rtol=1e-3, atol=1e-6)
  d0, a0 = rkd_loss(s, 0.1 * s - 2.0)
  np.testing.assert_allclose([d0, a0], [0.0, 0.0], atol=1e-6)
  # Duplicated examples stay finite, gradients too.
  dup = jnp.asarray(np.concatenate([s[:3], s[:2]]), jnp.float32)
  grads = jax.grad(lambda a: sum(rkd_loss(a, jnp.asarray(t, jnp.float32))))(dup)
  assert np.all(np.isfinite(grads))


# ---- CC -----------------------------------------------------------------------------------


def test_cc_against_numpy_symmetry_and_scaling():
  rng = rng_for(7)
  s = rng.normal(size=(6, 5))
  t = rng.normal(size=(6, 8))
  gamma, order = 0.4, 2

  def np_corr(f, order):
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    c = np.zeros((f.shape[0], f.shape[0]))
    for i in range(f.shape[0]):
      for j in range(f.shape[0]):
        sim = float(f[i] @ f[j])
        c[i, j] = sum(
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim**p
            for p in range(order + 1)
        )
    return c

  expected = np.mean((np_corr(s, order) - np_corr(t, order)) ** 2)
  np.testing.assert_allclose(cc.cc_loss(s, t, gamma, order), expected, rtol=RTOL)
  np.testing.assert_allclose(cc.cc_loss(t, s, gamma, order), expected, rtol=RTOL)  # symmetric
  scales = rng.uniform(0.1, 10.0, size=(6, 1))
  np.testing.assert_allclose(cc.cc_loss(s * scales, t, gamma, order), expected, rtol=1e-4)
  np.testing.assert_allclose(cc.cc_loss(s, s, gamma, order), 0.0, atol=1e-7)
  # A high Taylor order recovers the exact Gaussian RBF kernel of the normalised rows.
  f = s / np.linalg.norm(s, axis=1, keepdims=True)
  rbf = np.exp(-gamma * ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
  np.testing.assert_allclose(cc.correlation_matrix(s, gamma, order=12), rbf, rtol=1e-5)


# ---- SP -----------------------------------------------------------------------------------


def test_sp_against_numpy_and_invariances():
  rng = rng_for(8)
  s = rng.normal(size=(5, 2, 2, 3))
  t = rng.normal(size=(5, 4, 4, 2))

  def np_g(f):
    f = f.reshape(f.shape[0], -1)
    g = f @ f.T
    return g / np.sqrt((g**2).sum(axis=1, keepdims=True))

  expected = ((np_g(t) - np_g(s)) ** 2).sum() / 25
  np.testing.assert_allclose(sp.sp_loss(s, t), expected, rtol=RTOL)
  np.testing.assert_allclose(sp.sp_loss(0.01 * s, 50 * t), expected, rtol=1e-4)  # global scale
  perm = rng.permutation(5)
  np.testing.assert_allclose(sp.sp_loss(s[perm], t[perm]), expected, rtol=1e-4)
  np.testing.assert_allclose(sp.sp_loss(s, 3 * s), 0.0, atol=1e-7)


# ---- ICKD ---------------------------------------------------------------------------------


def test_ickd_against_numpy_and_invariances():
  rng = rng_for(9)
  s = rng.normal(size=(3, 4, 4, 5))
  t = rng.normal(size=(3, 4, 4, 5))
  total = 0.0
  for i in range(3):
    gs = s[i].reshape(-1, 5).T @ s[i].reshape(-1, 5)
    gt = t[i].reshape(-1, 5).T @ t[i].reshape(-1, 5)
    gs = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    total += ((gs - gt) ** 2).sum()
  expected = total / (5 * 3)
  np.testing.assert_allclose(ickd.ickd_loss(s, t), expected, rtol=RTOL)
  per_example = rng.uniform(0.2, 5.0, size=(3, 1, 1, 1))
  np.testing.assert_allclose(ickd.ickd_loss(s * per_example, t), expected, rtol=1e-4)
  positions = rng.permutation(16)
  s_perm = s.reshape(3, 16, 5)[:, positions].reshape(3, 4, 4, 5)
  np.testing.assert_allclose(ickd.ickd_loss(s_perm, t), expected, rtol=1e-4)
  with pytest.raises(ValueError, match='connector'):
    ickd.ickd_loss(s[..., :3], t)


# ---- FitNet -------------------------------------------------------------------------------


def test_hint_loss_against_numpy():
  rng = rng_for(10)
  s = rng.normal(size=(2, 3, 3, 4))
  t = rng.normal(size=(2, 3, 3, 4))
  np.testing.assert_allclose(fitnet.hint_loss(s, t), np.sum((s - t) ** 2) / s.size, rtol=RTOL)
  with pytest.raises(ValueError, match=r'\(2, 3, 3, 4\)'):
    fitnet.hint_loss(s[..., :2], t)


# ---- AT -----------------------------------------------------------------------------------


def test_at_against_numpy_scaling_and_shape_error():
  rng = rng_for(11)
  s = rng.normal(size=(3, 4, 4, 2))
  t = rng.normal(size=(3, 4, 4, 6))  # channel counts may differ

  def np_at(f):
    a = np.zeros((f.shape[0], f.shape[1] * f.shape[2]))
    for i in range(f.shape[0]):
      a[i] = (f[i] ** 2).mean(axis=-1).ravel()
      a[i] /= np.linalg.norm(a[i])
    return a

  expected = np.mean((np_at(s) - np_at(t)) ** 2)
  np.testing.assert_allclose(at.at_loss(s, t), expected, rtol=RTOL)
  np.testing.assert_allclose(at.at_loss(10 * s, 0.1 * t), expected, rtol=1e-4)
  np.testing.assert_allclose(at.at_loss(s, -2 * np.concatenate([s, s], -1)), 0.0, atol=1e-7)
  with pytest.raises(ValueError) as error:
    at.at_loss(s, t[:, :2, :2])
  assert '(3, 4, 4, 2)' in str(error.value) and '(3, 2, 2, 6)' in str(error.value)
  value, grad = jax.value_and_grad(at.at_loss)(jnp.zeros((3, 4, 4, 2)), jnp.asarray(t))
  assert np.isfinite(value) and np.all(np.isfinite(grad))


# ---- IE-KD --------------------------------------------------------------------------------


def test_iekd_losses_against_numpy():
  rng = rng_for(12)
  x = rng.normal(size=(4, 2, 2, 3))
  x_rec = rng.normal(size=(4, 2, 2, 3))
  np.testing.assert_allclose(
      iekd.autoencoder_reconstruction_loss(x, x_rec), np.abs(x - x_rec).sum() / x.size, rtol=RTOL
  )
  s = rng.normal(size=(4, 6))
  t = rng.normal(size=(4, 6))
  total = 0.0
  for i in range(4):
    total += np.abs(s[i] / np.linalg.norm(s[i]) - t[i] / np.linalg.norm(t[i])).sum()
  expected = total / s.size
  np.testing.assert_allclose(iekd.inheritance_loss(s, t), expected, rtol=RTOL)
  np.testing.assert_allclose(iekd.exploration_loss(s, t), -expected, rtol=RTOL)
  # Only directions count: a positively rescaled teacher code is inherited perfectly.
  np.testing.assert_allclose(iekd.inheritance_loss(s, 3 * s), 0.0, atol=1e-7)
  assert float(iekd.exploration_loss(s, -s)) <= float(iekd.exploration_loss(s, t))
  assert float(iekd.exploration_loss(s, -s)) >= -2 / math.sqrt(6) - 1e-6


# ---- mutual learning ----------------------------------------------------------------------


def test_mutual_kl_against_numpy_and_stop_gradient():
  rng = rng_for(13)
  peers = [rng.normal(size=(4, 5)) * 2 for _ in range(3)]
  tau = 2.0
  probs = [np_softmax(z / tau) for z in peers]
  expected = []
  for k in range(3):
    others = [
        np.mean([np_kl(probs[j][i], probs[k][i]) for i in range(4)]) for j in range(3) if j != k
    ]
    expected.append(tau**2 * np.mean(others))
  np.testing.assert_allclose(mutual.mutual_kl(peers, tau), expected, rtol=1e-5)
  np.testing.assert_allclose(mutual.mutual_kl(np.stack(peers), tau), expected, rtol=1e-5)
  stacked = jnp.asarray(np.stack(peers), jnp.float32)
  # Peer 0's loss moves only peer 0: the other peers' predictions are fixed targets.
  grad = jax.grad(lambda z: mutual.mutual_kl(z, tau)[0])(stacked)
  assert np.any(np.asarray(grad[0]) != 0)
  np.testing.assert_array_equal(grad[1:], np.zeros_like(grad[1:]))
  # Summing the per-peer losses gives every peer exactly its own gradient.
  grad_sum = jax.grad(lambda z: jnp.sum(mutual.mutual_kl(z, tau)))(stacked)
  np.testing.assert_allclose(grad_sum[0], grad[0], rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='at least 2'):
    mutual.mutual_kl(peers[:1])


# ---- ReviewKD's HCL (megvii-research/mdistiller distillers/ReviewKD.py) ---------------------


def np_adaptive_avg_pool2d(x, out):
  """PyTorch's adaptive_avg_pool2d(x, (out, out)) on an NCHW array, with loops: bin i covers
  rows floor(i h / out) .. ceil((i + 1) h / out) - 1, columns alike."""
  n, c, h, w = x.shape
  y = np.zeros((n, c, out, out))
  for i in range(out):
    r0, r1 = math.floor(i * h / out), math.ceil((i + 1) * h / out)
    for j in range(out):
      c0, c1 = math.floor(j * w / out), math.ceil((j + 1) * w / out)
      y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
  return y


def np_hcl_loss(fstudent, fteacher):
  """A NumPy transcription of mdistiller's hcl_loss on NCHW maps."""
  loss_all = 0.0
  for fs, ft in zip(fstudent, fteacher):
    h = fs.shape[2]
    loss = np.mean((fs - ft) ** 2)
    cnt, tot = 1.0, 1.0
    for l in (4, 2, 1):
      if l >= h:
        continue
      cnt /= 2.0
      loss += np.mean((np_adaptive_avg_pool2d(fs, l) - np_adaptive_avg_pool2d(ft, l)) ** 2) * cnt
      tot += cnt
    loss_all += loss / tot
  return loss_all


@pytest.mark.parametrize('sizes', [(8, 4, 2, 1), (32, 16, 8, 1), (7, 5, 3)])
def test_hcl_against_mdistiller(sizes):
  """Maps of several sizes (the zoo's, and sizes the pools do not divide: PyTorch's uneven
  bins), one channel count a level, a 1x1 level as the pooled embedding."""
  rng = rng_for(51)
  students = [rng.normal(size=(3, 2 + k, hw, hw)) for k, hw in enumerate(sizes)]
  teachers = [rng.normal(size=s.shape) * 1.5 + 0.3 for s in students]
  expected = np_hcl_loss(students, teachers)
  got = reviewkd.hcl_loss(
      [jnp.asarray(to_nhwc(s), jnp.float32) for s in students],
      [jnp.asarray(to_nhwc(t), jnp.float32) for t in teachers],
  )
  np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_hcl_pool_weights_and_adaptive_pool():
  """One level: the weights halve with each pool taken (h = 4: 1, 1/2, 1/4), and the pool is
  PyTorch's on an uneven size."""
  rng = rng_for(52)
  x = rng.normal(size=(2, 3, 7, 7))
  for out in (4, 2, 1):
    np.testing.assert_allclose(
        reviewkd.adaptive_avg_pool(jnp.asarray(to_nhwc(x), jnp.float32), out),
        to_nhwc(np_adaptive_avg_pool2d(x, out)),
        rtol=1e-5,
        atol=1e-6,
    )
  s = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  mse = lambda a, b: jnp.mean((a - b) ** 2)
  pool = reviewkd.adaptive_avg_pool
  want = (mse(s, t) + 0.5 * mse(pool(s, 2), pool(t, 2)) + 0.25 * mse(pool(s, 1), pool(t, 1))) / 1.75
  np.testing.assert_allclose(reviewkd.hcl_level(s, t), want, rtol=1e-6)


def test_hcl_properties_and_gradients():
  rng = rng_for(53)
  s = [jnp.asarray(rng.normal(size=(2, hw, hw, 3)), jnp.float32) for hw in (8, 2, 1)]
  t = [jnp.asarray(rng.normal(size=(2, hw, hw, 3)), jnp.float32) for hw in (8, 2, 1)]
  assert float(reviewkd.hcl_loss(s, s)) == 0.0
  assert float(reviewkd.hcl_loss(s, t)) > 0
  g_s, g_t = jax.grad(reviewkd.hcl_loss, argnums=(0, 1))(s, t)
  assert all(np.any(np.asarray(g) != 0) for g in g_s + g_t)
  g_stopped = jax.grad(lambda t: reviewkd.hcl_loss(s, [jax.lax.stop_gradient(x) for x in t]))(t)
  assert not any(np.any(np.asarray(g)) for g in g_stopped)
  with pytest.raises(ValueError, match='one shape at every level'):
    reviewkd.hcl_loss([s[0][..., :2]], [t[0]])
  with pytest.raises(ValueError, match='as many teacher maps'):
    reviewkd.hcl_loss(s, t[:2])


# ---- every loss is jittable ---------------------------------------------------------------


def test_every_loss_jits():
  rng = rng_for(14)
  maps = [jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.float32) for _ in range(2)]
  logits = [jnp.asarray(rng.normal(size=(4, 5)), jnp.float32) for _ in range(2)]
  labels = jnp.asarray([0, 3, 1, 4])
  scores = jnp.asarray(rng.uniform(size=3), jnp.float32)
  stage_losses = jnp.asarray(rng.uniform(size=3), jnp.float32)
  cases = [
      (classification.cross_entropy, (logits[0], labels)),
      (lambda t, s: classification.softened_kl(t, s, 4.0), tuple(logits)),
      (lambda z, y: classification.top_k_correct(z, y, 2), (logits[0], labels)),
      (classification.standardize_logits, (logits[0],)),
      (lambda t, s: ffkd.channel_kl(t, s, 4.0), tuple(maps)),
      (ffkd.forward_channel_loss, (scores, stage_losses)),
      (ffkd.feedback_channel_loss, (scores, stage_losses)),
      (lambda s, t: dist.dist_loss(s, t, 4.0), tuple(logits)),
      (lambda s, t: dkd.dkd_loss(s, t, labels, 1.0, 8.0, 4.0), tuple(logits)),
      (cd.channel_distillation_loss, tuple(maps)),
      (ccs.ccs_loss, tuple(maps)),
      (lambda s, t: reviewkd.hcl_loss([s], [t]), tuple(maps)),
      (lambda s, t: cd.guided_kd_loss(s, t, labels, 4.0)[0], tuple(logits)),
      (lambda s, t: rkd.rkd_loss(s, t)[0] + rkd.rkd_loss(s, t)[1], tuple(maps)),
      (cc.cc_loss, tuple(maps)),
      (sp.sp_loss, tuple(maps)),
      (ickd.ickd_loss, tuple(maps)),
      (fitnet.hint_loss, tuple(maps)),
      (at.at_loss, tuple(maps)),
      (iekd.autoencoder_reconstruction_loss, tuple(maps)),
      (iekd.inheritance_loss, tuple(maps)),
      (iekd.exploration_loss, tuple(maps)),
      (lambda a, b: mutual.mutual_kl([a, b], 2.0), tuple(logits)),
  ]
  for fn, args in cases:
    assert np.all(np.isfinite(jax.jit(fn)(*args)))


# ---- FFKD's channel KL (wp502/SKD-RSL zoo/Our_1.py) ---------------------------------------


def np_our_loss_channel_kl(t_nchw, s_nchw, T, is_feedback):
  """A NumPy transcription of Our_1.py's per-pair channel loss on NCHW maps (after ConvReg)."""
  n, c = t_nchw.shape[:2]
  s_temp = (s_nchw / T).reshape(n, c, -1)
  t_temp = (t_nchw / T).reshape(n, c, -1)

  def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

  def kl_div_sum(input_log_prob, target_prob):  # nn.KLDivLoss(reduction='sum')
    return np.sum(target_prob * (np.log(target_prob) - input_log_prob))

  if is_feedback:
    loss = kl_div_sum(log_softmax(t_temp), np.exp(log_softmax(s_temp)))
  else:
    loss = kl_div_sum(log_softmax(s_temp), np.exp(log_softmax(t_temp)))
  return loss * (T * T) / (n * c)


@pytest.mark.parametrize('is_feedback', [False, True])
@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_channel_kl_matches_our_1(is_feedback, temperature):
  rng = np.random.default_rng(11)
  teacher = rng.normal(size=(5, 6, 4, 3)) * 3.0  # NCHW, as the reference
  student = rng.normal(size=(5, 6, 4, 3)) * 3.0
  expected = np_our_loss_channel_kl(teacher, student, temperature, is_feedback)
  u, v = (jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32) for x in (teacher, student))
  # Forward: channel_kl(U, R(V)); feedback: channel_kl(R(sg(V)), U).
  got = ffkd.channel_kl(v, u, temperature) if is_feedback else ffkd.channel_kl(u, v, temperature)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_channel_kl_gradients_match_finite_differences_of_our_1(temperature):
  """channel_kl's written-out VJP against central differences of the float64 NumPy transcription
  of Our_1.py, for both arguments, along random directions and at single entries."""
  rng = np.random.default_rng(13)
  teacher = rng.normal(size=(3, 4, 3, 5)) * 2.0  # NCHW
  student = rng.normal(size=(3, 4, 3, 5)) * 2.0

  def loss(t_nchw, s_nchw):  # channel_kl(target=t, source=s), as the forward call
    return np_our_loss_channel_kl(t_nchw, s_nchw, temperature, is_feedback=False)

  to_nhwc = lambda x: jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32)
  cotangent = 2.5  # not 1, so that a VJP ignoring its cotangent fails
  _, vjp = jax.vjp(
      lambda a, b: ffkd.channel_kl(a, b, temperature), to_nhwc(teacher), to_nhwc(student)
  )
  grads = [
      np.transpose(np.asarray(g), (0, 3, 1, 2)) / cotangent for g in vjp(jnp.float32(cotangent))
  ]
  h = 1e-6
  for which, grad in enumerate(grads):
    for trial in range(3):
      direction = rng.normal(size=teacher.shape)
      shifted = [[teacher, student], [teacher, student]]
      shifted[0][which] = shifted[0][which] + h * direction
      shifted[1][which] = shifted[1][which] - h * direction
      numeric = (loss(*shifted[0]) - loss(*shifted[1])) / (2 * h)
      np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-4, atol=1e-7)
    index = (1, 2, 0, 3)
    bump = np.zeros(teacher.shape)
    bump[index] = h
    args_plus, args_minus = [teacher, student], [teacher, student]
    args_plus[which], args_minus[which] = args_plus[which] + bump, args_minus[which] - bump
    numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * h)
    np.testing.assert_allclose(grad[index], numeric, rtol=1e-4, atol=1e-7)


def test_channel_kl_keeps_the_input_dtype_in_its_gradients():
  rng = np.random.default_rng(15)
  u, v = (jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.bfloat16) for _ in range(2))
  grad = jax.grad(lambda a, b: ffkd.channel_kl(a, b, 4.0), argnums=(0, 1))
  g_u, g_v = grad(u, v)
  assert g_u.dtype == g_v.dtype == jnp.bfloat16
  assert ffkd.channel_kl(u, v, 4.0).dtype == jnp.float32
  # the float32 computation on the same (bfloat16-representable) values, rounded once
  for got, want in zip((g_u, g_v), grad(u.astype(jnp.float32), v.astype(jnp.float32))):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2 * np.abs(want).max()
    )
  with pytest.raises(ValueError, match='temperature must be a Python number'):
    jax.jit(lambda t: ffkd.channel_kl(u, v, t))(4.0)


def test_channel_kl_properties_and_gradients():
  rng = np.random.default_rng(12)
  u = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.float32)
  assert float(ffkd.channel_kl(u, u, 4.0)) == pytest.approx(0.0, abs=1e-6)
  assert float(ffkd.channel_kl(u, v, 4.0)) > 0
  # A per-channel constant shift changes no spatial distribution.
  shifted = u + jnp.arange(5, dtype=jnp.float32)
  assert float(ffkd.channel_kl(shifted, v, 4.0)) == pytest.approx(
      float(ffkd.channel_kl(u, v, 4.0)), rel=1e-5
  )
  # Gradients reach both arguments unless the caller stops one.
  g_target, g_source = jax.grad(lambda a, b: ffkd.channel_kl(a, b, 4.0), argnums=(0, 1))(u, v)
  assert np.any(np.asarray(g_target) != 0) and np.any(np.asarray(g_source) != 0)
  g_stopped = jax.grad(lambda a: ffkd.channel_kl(jax.lax.stop_gradient(a), v, 4.0))(u)
  assert not np.any(np.asarray(g_stopped))
  with pytest.raises(ValueError, match='same shape'):
    ffkd.channel_kl(u, v[:, :2], 4.0)


# ---- KDCL (wp502/SKD-RSL zoo/KDCL.py and its online loop) ---------------------------------


def np_kdcl_losses(outputs, labels, T, alpha, gamma):
  """A NumPy transcription: stable_out = mean of the peers' logits (detached); per peer,
  alpha CE + gamma kl_div(log_softmax(z_k / T), softmax(stable / T), 'batchmean') T^2."""

  def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

  stable = np.mean(outputs, axis=0)
  target = np.exp(log_softmax(stable / T))
  result = []
  for z in outputs:
    ce = -np.mean(log_softmax(z)[np.arange(len(labels)), labels])
    kl = np.sum(target * (np.log(target) - log_softmax(z / T))) / len(labels) * T * T
    result.append((alpha * ce + gamma * kl, kl))
  return result


def test_kdcl_ensemble_kl_matches_the_reference_and_stops_the_ensemble():
  rng = rng_for(21)
  outputs = rng.normal(size=(3, 6, 5)) * 2
  labels = rng.integers(0, 5, size=6)
  want = np_kdcl_losses(outputs, labels, 4.0, 1.0, 1.0)
  got = kdcl.ensemble_kl(jnp.asarray(outputs, jnp.float32), 4.0)
  np.testing.assert_allclose(got, [kl for _, kl in want], rtol=1e-5)
  # The ensemble is a fixed target: peer k's KL has a gradient only through peer k.
  grad = jax.grad(lambda z: kdcl.ensemble_kl(z, 4.0)[0])(jnp.asarray(outputs, jnp.float32))
  assert np.any(np.asarray(grad[0])) and not np.any(np.asarray(grad[1:]))
  with pytest.raises(ValueError, match='at least 2 peers'):
    kdcl.ensemble_kl(jnp.zeros((1, 2, 3)), 4.0)
