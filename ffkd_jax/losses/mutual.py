"""Deep mutual learning: Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018.

Each of K peers is trained with CE plus the mean KL from every other peer's (fixed) prediction:

  L_k = CE(y, z_k) + 1/(K-1) sum_{j != k} tau^2 KL(sg(p_j^tau) || p_k^tau),

KL summed over classes and averaged over examples (kl_div 'batchmean'); tau = 1 in the paper
(and in IE-KD's DMLLoss), tau^2 keeps gradient scales comparable for other temperatures.
`mutual_kl` returns the KL part of every L_k at once; summing its entries is the joint
objective whose gradient with respect to peer k's parameters is exactly dL_k (the
stop-gradient keeps each peer's target fixed).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def mutual_kl(logits_list: Sequence[jax.Array] | jax.Array, temperature: float = 1.0) -> jax.Array:
  """Per-peer mutual-learning KL: out[k] = mean_{j != k} tau^2 mean_n KL(sg(p_j) || p_k).

  Args:
    logits_list: K >= 2 arrays (n, classes), or one stacked (K, n, classes) array.
    temperature: tau.
  Returns:
    (K,) losses, one per peer.
  """
  if hasattr(logits_list, 'ndim'):
    logits = jnp.asarray(logits_list)  # (K, n, classes)
  else:
    logits = jnp.stack([jnp.asarray(z) for z in logits_list])  # (K, n, classes)
  if logits.ndim != 3 or logits.shape[0] < 2:
    raise ValueError(
        f"mutual_kl needs at least 2 peers' logits of shape (n, classes); got stacked "
        f'shape {logits.shape}'
    )
  num_peers = logits.shape[0]
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  log_p = jax.nn.log_softmax(logits / temperature, axis=-1)  # (K, n, classes)
  target_log_p = jax.lax.stop_gradient(log_p)
  target_p = jnp.exp(target_log_p)
  # kl[j, k] = mean_n sum_c p_j (log p_j - log p_k)
  entropy_term = jnp.mean(jnp.sum(target_p * target_log_p, axis=-1), axis=-1)  # (K,)
  cross_term = jnp.einsum('jnc,knc->jk', target_p, log_p) / logits.shape[1]  # (K, K)
  kl = entropy_term[:, None] - cross_term  # (K, K)
  off_diagonal = 1.0 - jnp.eye(num_peers, dtype=kl.dtype)
  return temperature**2 * jnp.sum(kl * off_diagonal, axis=0) / (num_peers - 1)
