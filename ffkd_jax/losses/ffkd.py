"""FFKD's CKA-weighted forward and feedback losses, exactly as docs/FFKD.md states.

FFKD is "Reciprocal Teacher-Student Learning via Forward and Feedback Knowledge Distillation"
(Gou et al., IEEE Transactions on Multimedia 26, 2024). Its code and full text are not public:
these formulas are this project's reconstruction (docs/FFKD.md), not the authors' code.

For one layer pair: teacher map U (n, H, W, C), student map V mapped by a connector to the same
shape, channel understanding omega[c] = CKA(U[..., c], V[..., c]) from `ffkd_jax.cka.channel_cka`.

  w[c]   = C * softmax_c((1 - sg(omega[c])) / tau_w)                 channel_weights
  L_feat = mean_c w[c] * mean_{n,h,w} (V[..., c] - sg(U[..., c]))^2  weighted_feature_loss
  L_fb   = mean_c w[c] * (1 - omega[c])                               feedback_alignment_loss

For the feedback loss, omega is computed with sg(V), so its gradient reaches only the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def channel_weights(omega: jax.Array, temperature: float, scale: float | None = None) -> jax.Array:
  """CKA weighting constraint: w = scale * softmax((1 - sg(omega)) / temperature) over channels.

  Channels the student understands least (smallest omega) weigh most. The softmax is over the
  last axis; omega is stop-gradiented, so the weights carry no gradient. With the default
  scale = C (the number of channels, omega.shape[-1]) the weights sum to C, i.e. their mean is
  1, and uniform omega gives w = 1 (the same scale as the unweighted loss).

  Args:
    omega: (..., c) channel CKA values in [0, 1].
    temperature: tau_w > 0; large tau_w -> uniform weights, small -> the worst channel only.
    scale: total weight per layer; None means c.
  Returns:
    (..., c) weights, each row summing to `scale`.
  """
  omega = jax.lax.stop_gradient(omega)
  if scale is None:
    scale = omega.shape[-1]
  return scale * jax.nn.softmax((1.0 - omega) / temperature, axis=-1)


def weighted_feature_loss(u: jax.Array, v: jax.Array, weights: jax.Array) -> jax.Array:
  """Channel-weighted feature MSE: mean_c w[c] * mean_{n,h,w} (v[..., c] - sg(u[..., c]))^2.

  The teacher map gets no gradient (forward loss updates the student and its connector only).
  The weights are used as given (`channel_weights` already stops their gradient).

  Args:
    u: (n, h, w, c) teacher map U.
    v: (n, h, w, c) student map V after the connector.
    weights: (c,) channel weights (all ones for the unweighted loss).
  Returns:
    A scalar.
  """
  if u.shape != v.shape:
    raise ValueError(
        f'weighted_feature_loss needs the teacher map and the connector-mapped student map '
        f'in the same shape; got teacher {u.shape} and student {v.shape}'
    )
  if weights.shape != (u.shape[-1],):
    raise ValueError(
        f'weighted_feature_loss needs one weight per channel, shape ({u.shape[-1]},); '
        f'got {weights.shape}'
    )
  diff = v - jax.lax.stop_gradient(u)  # (n, h, w, c)
  per_channel = jnp.mean(diff * diff, axis=tuple(range(diff.ndim - 1)))  # (c,)
  return jnp.mean(weights * per_channel)


def feedback_alignment_loss(omega: jax.Array, weights: jax.Array) -> jax.Array:
  """Feedback term of the teacher's loss: mean_c w[c] * (1 - omega[c]).

  omega must come from `channel_cka(U, sg(V))` so that only the teacher is pushed toward
  forms the student can follow. With stacked layers, (l, c) inputs, the per-layer means are
  summed over l (the sum over layer pairs in docs/FFKD.md).

  Args:
    omega: (c,) or (l, c) channel CKA values.
    weights: the same shape, channel weights.
  Returns:
    A scalar.
  """
  if omega.shape != weights.shape:
    raise ValueError(
        f'feedback_alignment_loss needs omega and weights in the same shape; got '
        f'{omega.shape} and {weights.shape}'
    )
  return jnp.sum(jnp.mean(weights * (1.0 - omega), axis=-1))
