"""HSIC and linear CKA (centred kernel alignment), pure and jittable.

Linear CKA (Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations
Revisited", ICML 2019) of X (n, p) and Y (n, q), columns centred:

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X X^T, L = Y Y^T
              = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)       (feature form, p x q matrices)
              = <K, L>_F / (||K||_F ||L||_F)                    (Gram form, n x n matrices)

The unbiased option replaces HSIC by the unbiased estimator of Song et al. (ICML 2007), which is
available only through the Gram form.

FFKD uses this to measure how well the student understands the teacher: `channel_cka` gives
omega[c] for every channel at once, `layer_cka` the whole-layer Omega (see docs/FFKD.md).

Numerics (all documented behaviour, tested in tests/test_cka.py):
- Inputs are promoted to at least float32; matrix products use `Precision.HIGHEST` so that TF32
  or bf16 passes on accelerators do not change the metric.
- Columns are centred in two passes (the second pass removes the rounding residue of the first),
  so a constant feature becomes exactly or almost exactly zero. In the biased Gram form the
  second pass is H K H on the n x n Gram, the same correction at n^2 cost instead of a pass over
  the (n, p) input (FFKD's stage CKA runs on maps of up to 65536 features, twice a step).
- Each centred input is rescaled by sqrt(||Xc||^2 + eps * ||X||^2 + 1e-20) (in the biased Gram
  form its Gram by ||Xc||^2 + eps * ||X||^2 + 1e-15). CKA is invariant to isotropic scaling, so
  this changes nothing for a varying representation, keeps the products O(1), and makes `eps`
  scale free.
- The biased denominator is sqrt(HSIC(K, K) HSIC(L, L) + eps^2), so nothing divides by zero and
  gradients stay finite. The unbiased one rescales K and L to unit Frobenius norm first (its
  terms are O(1/n^2), which an absolute eps would swamp) and guards only a zero denominator.
- Defined value: CKA is 0 (up to ~1e-10) when either representation is constant over the batch
  (e.g. a dead ReLU channel), with finite (zero) gradients. A representation whose centred
  energy is below about eps times its raw energy counts as constant.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# Absolute floor under the rescaling energy: keeps an all-zero input finite. The backward pass
# raises it to the power -3/2 (1e-20 ** -1.5 = 1e30), which must stay far below float32
# overflow, so it is not finfo.tiny.
_ABS_FLOOR = 1e-20
# The same floor for `_normalised_gram`, whose backward pass raises it to the power -2.
_GRAM_FLOOR = 1e-15


def _as_float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _column_means(x: jax.Array) -> jax.Array:
  """The column means of x (n, p), as a (1, p) row: a vector-matrix product with 1/n.

  The same numbers as `jnp.mean(x, axis=0, keepdims=True)` up to rounding, but XLA's CPU backend
  runs its reduction over the major axis of a wide matrix as a slow strided loop: 16.9 ms
  against 0.36 ms for this product at (64, 65536), FFKD's first-stage map (2026-12-01, 2-core
  Xeon), which made the stage CKA the largest loss term of the resnet32x4 step.
  """
  n = x.shape[0]
  return jnp.dot(jnp.full((1, n), 1.0 / n, x.dtype), x, precision=_HIGHEST)


def _centre_columns(x: jax.Array) -> jax.Array:
  """x (n, p) -> x minus its column means, in two passes (the second removes rounding)."""
  xc = x - _column_means(x)
  return xc - _column_means(xc)


def _centre_and_rescale(x: jax.Array, eps: float) -> jax.Array:
  """x (n, p) -> centred x divided by sqrt(||xc||_F^2 + eps ||x||_F^2 + floor)."""
  xc = _centre_columns(x)
  energy = jnp.sum(xc * xc) + eps * jnp.sum(x * x) + _ABS_FLOOR
  return xc * jax.lax.rsqrt(energy)


def _normalised_gram(x: jax.Array, eps: float) -> jax.Array:
  """The Gram matrix of `_centre_and_rescale(x, eps)`, (n, n), for the Gram form (n < p).

  The same matrix computed with one pass over x instead of four: the columns are centred once,
  the second centring is H K H on the n x n Gram (the same correction: H (x - m) = x - mean),
  and the rescaling divides the Gram by tr(H K H) + eps ||x||^2 + floor = ||xc||^2 + ...
  (FFKD computes this on every stage pair twice a step, on maps of up to 65536 features).
  """
  xc = x - _column_means(x)
  k = _centre_gram(jnp.einsum('ip,jp->ij', xc, xc, precision=_HIGHEST))
  energy = jnp.trace(k) + eps * jnp.sum(x * x) + _GRAM_FLOOR
  return k / energy


def _centre_gram(k: jax.Array) -> jax.Array:
  """H K H for a square k (n, n), H = I - 11^T / n."""
  k = k - jnp.mean(k, axis=0, keepdims=True)
  return k - jnp.mean(k, axis=1, keepdims=True)


_TINY = 1e-30  # below any real unbiased HSIC product of unit-norm Grams, above float32's 0


def _unit_frobenius(k: jax.Array) -> jax.Array:
  """k / ||k||_F, and k itself where it is 0 (finite gradients there too)."""
  squared = jnp.sum(k * k)
  nonzero = squared > _TINY
  return k / jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 1.0)


def _hsic_unbiased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Song et al. (2007) unbiased HSIC of Gram matrices k, l (n, n), n >= 4.

  With K~, L~ the Grams with zeroed diagonals:
    [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)).
  """
  n = k.shape[0]
  off_diagonal = 1.0 - jnp.eye(n, dtype=k.dtype)
  kt = k * off_diagonal  # (n, n)
  lt = l * off_diagonal  # (n, n)
  trace_kl = jnp.sum(kt * lt.T)
  sum_k = jnp.sum(kt)
  sum_l = jnp.sum(lt)
  ones_k_l_ones = jnp.dot(jnp.sum(kt, axis=0), jnp.sum(lt, axis=1), precision=_HIGHEST)
  value = trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_k_l_ones
  return value / (n * (n - 3))


def hsic(k: jax.Array, l: jax.Array, unbiased: bool = False) -> jax.Array:
  """Hilbert-Schmidt independence criterion of two n x n Gram matrices.

  Gretton et al. (2005) biased estimator: tr(K H L H) / (n-1)^2, H = I - 11^T/n.
  Song et al. (2007) unbiased estimator (`unbiased=True`, needs n >= 4): with K~, L~ the Grams
  with zeroed diagonals,
    [tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)).

  Args:
    k: (n, n) Gram matrix (e.g. X X^T).
    l: (n, n) Gram matrix.
    unbiased: use the unbiased estimator.
  Returns:
    A scalar.
  """
  k = _as_float(k)
  l = _as_float(l)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
    raise ValueError(
        f'hsic needs two square Gram matrices of the same shape; got {k.shape} and {l.shape}'
    )
  n = k.shape[0]
  if unbiased:
    if n < 4:
      raise ValueError(f'the unbiased HSIC estimator needs n >= 4 examples; got n={n}')
    return _hsic_unbiased(k, l)
  if n < 2:
    raise ValueError(f'HSIC needs n >= 2 examples; got n={n}')
  # tr(K H L H) = sum_ij (HKH)_ij (HLH)_ji, H idempotent.
  return jnp.sum(_centre_gram(k) * _centre_gram(l).T) / (n - 1) ** 2


def _use_gram_form(n: int, p: int, q: int) -> bool:
  """Static choice of form: n x n Grams when n < max(p, q), else p x q feature products.

  The Gram form costs ~n^2 (p + q) and the feature form ~n (p^2 + q^2 + pq); the rule keeps
  every intermediate no larger than about max(n, p, q)^2 elements.
  """
  return n < max(p, q)


def _cka_2d(x: jax.Array, y: jax.Array, unbiased: bool, eps: float) -> jax.Array:
  """CKA of x (n, p) and y (n, q), already float; shapes already checked."""
  n, p = x.shape
  q = y.shape[1]
  if not unbiased and _use_gram_form(n, p, q):
    xn = yn = None  # the Gram form rescales the Grams instead (`_normalised_gram`)
  else:
    xn = _centre_and_rescale(x, eps)  # (n, p), ||xn||_F <= 1
    yn = _centre_and_rescale(y, eps)  # (n, q)
  if unbiased:
    k = jnp.einsum('ip,jp->ij', xn, xn, precision=_HIGHEST)  # (n, n)
    l = jnp.einsum('iq,jq->ij', yn, yn, precision=_HIGHEST)  # (n, n)
    # Grams of unit-norm features make every unbiased term O(1/n^2) (scaled by 1/(n(n-3))), so an
    # absolute eps here would swamp them (at n=256 it gave 0.03 where the estimator is 0.49):
    # rescale the Grams to unit Frobenius norm, which CKA is invariant to, and guard only a
    # zero denominator (constant features).
    k, l = _unit_frobenius(k), _unit_frobenius(l)
    cross = _hsic_unbiased(k, l)
    # The unbiased self-terms can dip below zero for tiny n; clamp the product.
    product = jnp.maximum(_hsic_unbiased(k, k) * _hsic_unbiased(l, l), 0.0)
    # As in the biased form, a representation whose centred energy is below eps times its raw
    # energy (||xn||^2 < 1/2 after the rescaling above) counts as constant: CKA 0.
    varying = jnp.logical_and(jnp.sum(xn * xn) > 0.5, jnp.sum(yn * yn) > 0.5)
    defined = jnp.logical_and(product > _TINY, varying)
    denominator = jnp.sqrt(jnp.where(defined, product, 1.0))
    return jnp.where(defined, jnp.clip(cross / denominator, 0.0, 1.0), 0.0)
  if _use_gram_form(n, p, q):
    k = _normalised_gram(x, eps)  # (n, n)
    l = _normalised_gram(y, eps)  # (n, n)
    cross = jnp.sum(k * l)
    self_k = jnp.sum(k * k)
    self_l = jnp.sum(l * l)
  else:
    yx = jnp.einsum('nq,np->qp', yn, xn, precision=_HIGHEST)  # (q, p)
    xx = jnp.einsum('np,nr->pr', xn, xn, precision=_HIGHEST)  # (p, p)
    yy = jnp.einsum('nq,nr->qr', yn, yn, precision=_HIGHEST)  # (q, q)
    cross = jnp.sum(yx * yx)
    self_k = jnp.sum(xx * xx)
    self_l = jnp.sum(yy * yy)
  return cross / jnp.sqrt(self_k * self_l + eps**2)


def _check_pair(name: str, x: jax.Array, y: jax.Array, min_n: int) -> None:
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f'{name}: both inputs need the same number of examples; got shapes {x.shape} '
        f'and {y.shape}'
    )
  if x.shape[0] < min_n:
    raise ValueError(f'{name}: needs at least {min_n} examples; got shape {x.shape}')


def linear_cka(
    x: jax.Array, y: jax.Array, *, unbiased: bool = False, eps: float = 1e-6
) -> jax.Array:
  """Linear CKA of two representations of the same n examples (Kornblith et al., ICML 2019).

  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with columns centred; computed in the
  feature form (p x q products) or the Gram form (n x n products), picked by the static
  shapes: the Gram form when n < max(p, q), the feature form otherwise. With
  `unbiased=True` the HSICs are Song et al.'s (2007) unbiased estimators (Gram form, n >= 4)
  and the result is clipped into [0, 1].

  Invariant to orthogonal transforms and isotropic scaling of either input, not to general
  invertible linear maps. Returns 0 (with finite gradients) when either input is constant over
  the batch; see the module docstring for how `eps` enters.

  Args:
    x: (n, p) representation, one row per example.
    y: (n, q) representation of the same examples.
    unbiased: use the unbiased HSIC estimator.
    eps: relative energy floor and denominator regulariser (scale free).
  Returns:
    A float32 (or float64) scalar in [0, 1] (the biased value is not clipped; it can exceed
    1 only by rounding, ~1e-7).
  """
  x = _as_float(x)
  y = _as_float(y)
  if x.ndim != 2 or y.ndim != 2:
    raise ValueError(f'linear_cka needs 2-D inputs (n, features); got {x.shape} and {y.shape}')
  _check_pair('linear_cka', x, y, 4 if unbiased else 2)
  dtype = jnp.promote_types(x.dtype, y.dtype)
  return _cka_2d(x.astype(dtype), y.astype(dtype), unbiased, eps)


def channel_cka(
    u: jax.Array, v: jax.Array, *, unbiased: bool = False, eps: float = 1e-6
) -> jax.Array:
  """Per-channel linear CKA of two feature maps: FFKD's channel understanding omega.

  omega[c] = CKA(u[..., c] as (n, h*w), v[..., c] as (n, h'*w')): each example's spatial map
  of channel c is its feature vector. All channels at once (vmapped over c, no Python loop):
  the Gram form (c batched n x n einsums) when n < h*w, the feature form (c batched
  (h*w) x (h*w) einsums) otherwise (see `linear_cka`).

  Args:
    u: (n, h, w, c) teacher feature map.
    v: (n, h', w', c) student feature map mapped to the teacher's channels (spatial size may
      differ).
    unbiased: use the unbiased HSIC estimator.
    eps: see `linear_cka`.
  Returns:
    (c,) CKA values in [0, 1].
  """
  u = _as_float(u)
  v = _as_float(v)
  if u.ndim != 4 or v.ndim != 4:
    raise ValueError(f'channel_cka needs NHWC maps; got shapes {u.shape} and {v.shape}')
  if u.shape[-1] != v.shape[-1]:
    raise ValueError(
        f'channel_cka needs the same number of channels; got shapes {u.shape} and {v.shape}'
    )
  _check_pair('channel_cka', u, v, 4 if unbiased else 2)
  dtype = jnp.promote_types(u.dtype, v.dtype)
  n, c = u.shape[0], u.shape[-1]
  x = u.reshape(n, -1, c).astype(dtype)  # (n, h*w, c)
  y = v.reshape(n, -1, c).astype(dtype)  # (n, h'*w', c)
  per_channel = functools.partial(_cka_2d, unbiased=unbiased, eps=eps)
  return jax.vmap(per_channel, in_axes=(2, 2))(x, y)  # (c,)


def layer_cka(
    u: jax.Array, v: jax.Array, *, unbiased: bool = False, eps: float = 1e-6
) -> jax.Array:
  """Whole-layer linear CKA: FFKD's layer understanding Omega.

  Each example's whole map is its feature vector: CKA(u as (n, h*w*c), v as (n, h'*w'*c')).
  Teacher and student shapes may differ in everything but n.

  Args:
    u: (n, ...) teacher representation (e.g. (n, h, w, c)).
    v: (n, ...) student representation (e.g. (n, h', w', c')).
    unbiased: use the unbiased HSIC estimator.
    eps: see `linear_cka`.
  Returns:
    A scalar in [0, 1].
  """
  u = _as_float(u)
  v = _as_float(v)
  if u.ndim < 1 or v.ndim < 1:
    raise ValueError(f'layer_cka needs batched inputs; got shapes {u.shape} and {v.shape}')
  _check_pair('layer_cka', u, v, 4 if unbiased else 2)
  n = u.shape[0]
  x = u.reshape(n, math.prod(u.shape[1:]))  # (n, h*w*c)
  y = v.reshape(n, math.prod(v.shape[1:]))  # (n, h'*w'*c')
  return linear_cka(x, y, unbiased=unbiased, eps=eps)


def layer_cka_matrix(
    row_features, column_features, *, unbiased: bool = False, eps: float = 1e-6
) -> jax.Array:
  """Whole-layer linear CKA between every row representation and every column one.

  The teacher-layer x student-layer picture of how two networks' representations relate
  (Kornblith et al. 2019, Fig. 4): entry [i, j] is `layer_cka(row_features[i],
  column_features[j])`. Training's diagnostics step and `python -m ffkd_jax.cka_report` both
  compute their matrix here.

  Args:
    row_features: sequence of (n, ...) representations (e.g. the teacher's stage outputs).
    column_features: sequence of (n, ...) representations of the same n examples.
    unbiased, eps: see `linear_cka`.
  Returns:
    (len(row_features), len(column_features)) CKA values.
  """
  row_features, column_features = list(row_features), list(column_features)
  if not row_features or not column_features:
    raise ValueError(
        f'layer_cka_matrix needs at least one representation on each side; got '
        f'{len(row_features)} rows and {len(column_features)} columns'
    )
  rows = [
      jnp.stack([layer_cka(u, v, unbiased=unbiased, eps=eps) for v in column_features])
      for u in row_features
  ]
  return jnp.stack(rows)  # (rows, columns)
