"""ffkd_jax.cka against plain float64 NumPy transcriptions and CKA's defining properties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ffkd_jax
from ffkd_jax import cka as cka_module

# Jitted once per shape: far fewer compilations than op-by-op dispatch, so the file stays fast.
linear_cka = jax.jit(ffkd_jax.linear_cka, static_argnames=('unbiased', 'eps'))
channel_cka = jax.jit(ffkd_jax.channel_cka, static_argnames=('unbiased', 'eps'))
layer_cka = jax.jit(ffkd_jax.layer_cka, static_argnames=('unbiased', 'eps'))
hsic = jax.jit(ffkd_jax.hsic, static_argnames=('unbiased',))

ATOL = 2e-5  # float32 JAX vs float64 NumPy


# ---- NumPy references (float64), written independently of the JAX code -------------------


def np_centering_matrix(n):
  return np.eye(n) - np.ones((n, n)) / n


def np_hsic_biased(k, l):
  """Gretton et al. 2005: tr(K H L H) / (n-1)^2 with an explicit H."""
  n = k.shape[0]
  h = np_centering_matrix(n)
  return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def np_hsic_unbiased_loops(k, l):
  """Song et al. 2007, term by term with explicit loops."""
  n = k.shape[0]
  kt = k.copy()
  lt = l.copy()
  for i in range(n):
    kt[i, i] = 0.0
    lt[i, i] = 0.0
  trace_kl = 0.0
  for i in range(n):
    for j in range(n):
      trace_kl += kt[i, j] * lt[j, i]
  sum_k = sum(kt[i, j] for i in range(n) for j in range(n))
  sum_l = sum(lt[i, j] for i in range(n) for j in range(n))
  ones_kl_ones = 0.0
  for i in range(n):
    for j in range(n):
      for m in range(n):
        ones_kl_ones += kt[i, j] * lt[j, m]
  return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_kl_ones) / (
      n * (n - 3)
  )


def np_kornblith_cka(x, y):
  """Kornblith et al. 2019, Gram form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
  k = x @ x.T
  l = y @ y.T
  return np_hsic_biased(k, l) / np.sqrt(np_hsic_biased(k, k) * np_hsic_biased(l, l))


def np_feature_cka(x, y):
  """Kornblith et al. 2019, feature form on centred columns."""
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(y.T @ x, 'fro') ** 2 / (
      np.linalg.norm(x.T @ x, 'fro') * np.linalg.norm(y.T @ y, 'fro')
  )


def np_unbiased_cka(x, y):
  k = x @ x.T
  l = y @ y.T
  return np_hsic_unbiased_loops(k, l) / np.sqrt(
      np_hsic_unbiased_loops(k, k) * np_hsic_unbiased_loops(l, l)
  )


def random_orthogonal(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


# ---- HSIC --------------------------------------------------------------------------------


def test_hsic_biased_and_unbiased_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5))
  y = rng.normal(size=(7, 3))
  k, l = x @ x.T, y @ y.T
  np.testing.assert_allclose(hsic(k, l), np_hsic_biased(k, l), rtol=1e-5, atol=ATOL)
  np.testing.assert_allclose(
      hsic(k, l, unbiased=True), np_hsic_unbiased_loops(k, l), rtol=1e-4, atol=ATOL
  )


def test_unbiased_hsic_needs_four_examples():
  k = np.eye(3)
  with pytest.raises(ValueError, match='n >= 4'):
    hsic(k, k, unbiased=True)


# ---- linear CKA against Kornblith's formula ---------------------------------------------


@pytest.mark.parametrize('n,p,q', [(6, 40, 30), (50, 4, 7), (12, 12, 3)])
def test_linear_cka_matches_kornblith(n, p, q):
  rng = np.random.default_rng(n + p + q)
  x = rng.normal(size=(n, p)) + 0.5  # uncentred on purpose
  y = x[:, :1] * rng.normal(size=(1, q)) + rng.normal(size=(n, q))  # some dependence
  expected = np_kornblith_cka(x, y)
  np.testing.assert_allclose(np_feature_cka(x, y), expected, rtol=1e-10)  # the two NumPy forms
  np.testing.assert_allclose(linear_cka(x, y), expected, atol=ATOL)


def test_gram_and_feature_forms_agree():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(10, 9)), jnp.float32)
  assert not cka_module._use_gram_form(10, 6, 9)
  assert cka_module._use_gram_form(10, 60, 90)
  assert cka_module._use_gram_form(10, 6, 11)
  feature = linear_cka(x, y)
  # Padding with zero columns changes no inner product but flips the static choice to Gram.
  gram = linear_cka(jnp.pad(x, ((0, 0), (0, 54))), jnp.pad(y, ((0, 0), (0, 81))))
  np.testing.assert_allclose(gram, feature, atol=ATOL)
  np.testing.assert_allclose(
      feature, np_feature_cka(np.asarray(x, np.float64), np.asarray(y, np.float64)), atol=ATOL
  )


def test_gram_form_of_features_far_from_zero_and_of_tiny_ones():
  """The Gram form centres the columns once and corrects the rounding residue on the n x n
  Gram (`_normalised_gram`): post-ReLU-like maps with a large offset, or a tiny scale, give
  float64 Kornblith's value."""
  rng = np.random.default_rng(11)
  x = np.abs(rng.normal(size=(8, 300)))
  y = np.abs(x[:, :100] + 0.5 * rng.normal(size=(8, 100)))
  assert cka_module._use_gram_form(8, 300, 100)
  expected = np_kornblith_cka(x, y)
  for shift, scale in [(0.0, 1.0), (1e3, 1.0), (0.0, 1e-6), (-40.0, 1e4)]:
    got = linear_cka(
        jnp.asarray(x * scale + shift, jnp.float32), jnp.asarray(y * scale, jnp.float32)
    )
    np.testing.assert_allclose(got, expected, atol=5e-4 if shift else ATOL, err_msg=str(shift))


def test_unbiased_cka_against_song_loops():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 5))
  y = x @ rng.normal(size=(5, 4)) + 0.5 * rng.normal(size=(8, 4))
  expected = np.clip(np_unbiased_cka(x - x.mean(0), y - y.mean(0)), 0.0, 1.0)
  assert 0.0 < expected < 1.0
  np.testing.assert_allclose(linear_cka(x, y, unbiased=True), expected, atol=1e-4)
  # The unbiased estimator is translation invariant, so uncentred inputs give the same value.
  np.testing.assert_allclose(
      np_unbiased_cka(x, y), np_unbiased_cka(x - x.mean(0), y - y.mean(0)), rtol=1e-8
  )


# ---- properties ---------------------------------------------------------------------------


def test_cka_of_x_with_itself_is_one():
  rng = np.random.default_rng(3)
  for shape in [(6, 30), (30, 6)]:
    x = rng.normal(size=shape)
    np.testing.assert_allclose(linear_cka(x, x), 1.0, atol=1e-5)
    np.testing.assert_allclose(linear_cka(x, x, unbiased=True), 1.0, atol=1e-4)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(16, 8))
  y = np.tanh(x @ rng.normal(size=(8, 5))) + 0.3 * rng.normal(size=(16, 5))
  base = float(linear_cka(x, y))
  qx, qy = random_orthogonal(rng, 8), random_orthogonal(rng, 5)
  np.testing.assert_allclose(linear_cka(x @ qx, y), base, atol=ATOL)
  np.testing.assert_allclose(linear_cka(x, y @ qy), base, atol=ATOL)
  np.testing.assert_allclose(linear_cka(37.0 * x, y), base, atol=ATOL)
  np.testing.assert_allclose(linear_cka(x, 1e-3 * y), base, atol=ATOL)
  np.testing.assert_allclose(linear_cka(x + 5.0, y - 2.0), base, atol=ATOL)  # translation
  base_u = float(linear_cka(x, y, unbiased=True))
  np.testing.assert_allclose(linear_cka(4.0 * x @ qx, y, unbiased=True), base_u, atol=1e-4)


def test_not_invariant_to_general_invertible_maps():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(20, 6))
  y = x[:, :3] + 0.1 * rng.normal(size=(20, 3))
  a = np.diag([30.0, 1.0, 1.0, 0.05, 1.0, 1.0]) @ rng.normal(size=(6, 6))  # invertible
  assert abs(np.linalg.det(a)) > 1e-3
  assert abs(float(linear_cka(x @ a, y)) - float(linear_cka(x, y))) > 1e-2
  np.testing.assert_allclose(linear_cka(x @ a, y), np_kornblith_cka(x @ a, y), atol=ATOL)


@pytest.mark.parametrize('unbiased', [False, True])
@pytest.mark.parametrize('p', [3, 50])  # feature form and Gram form
def test_constant_features_and_tiny_batch_are_finite(unbiased, p):
  rng = np.random.default_rng(6)
  n = 4
  constant = jnp.full((n, p), 2.5, jnp.float32)
  zeros = jnp.zeros((n, p), jnp.float32)
  x = jnp.asarray(rng.normal(size=(n, p)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(n, p)), jnp.float32)
  value_and_grads = jax.jit(
      jax.value_and_grad(lambda a, b: ffkd_jax.linear_cka(a, b, unbiased=unbiased), argnums=(0, 1))
  )
  for a, b in [(constant, y), (y, constant), (constant, constant), (zeros, zeros)]:
    value, grads = value_and_grads(a, b)
    assert np.isfinite(value) and abs(float(value)) < 1e-6  # defined as 0
    assert all(np.all(np.isfinite(g)) for g in grads)
  value, grads = value_and_grads(x, y)
  assert 0.0 <= float(value) <= 1.0
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


# ---- channel and layer CKA ----------------------------------------------------------------


@pytest.mark.parametrize('n,hw', [(4, 3), (12, 2)])  # Gram form (n < h*w) and feature form
def test_channel_cka_equals_loop_of_linear_cka(n, hw):
  rng = np.random.default_rng(7)
  c = 5
  u = rng.normal(size=(n, hw, hw, c))
  v = 0.7 * u + rng.normal(size=(n, hw, hw, c))
  v[..., 2] = 1.0  # a dead channel in the student
  omega = channel_cka(u, v)
  assert omega.shape == (c,)
  for ch in range(c):
    x = u[..., ch].reshape(n, -1)
    y = v[..., ch].reshape(n, -1)
    np.testing.assert_allclose(omega[ch], linear_cka(x, y), atol=ATOL)
    if ch != 2:
      np.testing.assert_allclose(omega[ch], np_kornblith_cka(x, y), atol=ATOL)
  assert abs(float(omega[2])) < 1e-6
  grads = jax.jit(jax.grad(lambda a, b: jnp.sum(channel_cka(a, b)), argnums=(0, 1)))(
      jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  )
  assert all(np.all(np.isfinite(g)) for g in grads)
  omega_u = channel_cka(u, v, unbiased=True)
  for ch in range(c):
    np.testing.assert_allclose(
        omega_u[ch],
        linear_cka(u[..., ch].reshape(n, -1), v[..., ch].reshape(n, -1), unbiased=True),
        atol=1e-4,
    )


def test_channel_cka_is_jittable_and_checks_shapes():
  rng = np.random.default_rng(8)
  u = jnp.asarray(rng.normal(size=(6, 4, 4, 3)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(6, 2, 2, 3)), jnp.float32)  # spatial sizes may differ
  np.testing.assert_allclose(ffkd_jax.channel_cka(u, v), channel_cka(u, v), atol=1e-6)
  with pytest.raises(ValueError, match='channels'):
    channel_cka(u, v[..., :2])
  with pytest.raises(ValueError, match='examples'):
    channel_cka(u, v[:5])


def test_layer_cka_flattens_whole_maps():
  rng = np.random.default_rng(9)
  u = rng.normal(size=(6, 4, 4, 3))
  v = rng.normal(size=(6, 2, 2, 5))  # teacher and student shapes differ
  v[..., 0] += u[:, ::2, ::2, 0]
  expected = np_kornblith_cka(u.reshape(6, -1), v.reshape(6, -1))
  np.testing.assert_allclose(layer_cka(u, v), expected, atol=ATOL)
  np.testing.assert_allclose(layer_cka(u, u), 1.0, atol=1e-5)


def test_all_pairs_of_small_inputs_stay_in_unit_interval():
  rng = np.random.default_rng(10)
  xs = [rng.normal(size=(5, 1)), rng.normal(size=(5, 9)), np.ones((5, 9))]
  for a, b in itertools.product(xs, repeat=2):
    for unbiased in (False, True):
      value = float(linear_cka(a, b, unbiased=unbiased))
      assert 0.0 <= value <= 1.0 + 1e-6


def test_unbiased_cka_at_a_realistic_batch_matches_the_estimator():
  """n = 256 examples of p = 512 features (a CIFAR stage at batch 256): the unbiased estimator's
  value, not the epsilon's (an absolute epsilon once gave 0.03 for 0.49)."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(256, 512))
  y = x[:, :256] @ rng.normal(size=(256, 128)) + 2.0 * rng.normal(size=(256, 128))
  expected = np_unbiased_cka(x - x.mean(0), y - y.mean(0))
  assert 0.2 < expected < 0.9
  np.testing.assert_allclose(float(linear_cka(x, y, unbiased=True)), expected, atol=2e-3)
  # Scale does not matter, and constant features give 0, finitely.
  np.testing.assert_allclose(float(linear_cka(1e-4 * x, y, unbiased=True)), expected, atol=2e-3)
  assert float(linear_cka(np.ones((256, 8)), y, unbiased=True)) == 0.0
