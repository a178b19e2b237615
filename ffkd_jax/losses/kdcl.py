"""KDCL: Guo, Wang, Wu, Yu, Liang, Hu, Luo, "Online Knowledge Distillation via Collaborative
Learning", CVPR 2020, as wp502/SKD-RSL runs it for FFKD's comparison (zoo/KDCL.py `KDCLLoss`,
train_one_epoch.py's online loop with `distill == 'kdcl'`):

  z_ens = sg(mean_k z_k)                                       the peers' mean logits
  L_k   = alpha CE(y, z_k) + gamma tau^2 KL(p(z_ens / tau) || p(z_k / tau))

KL summed over classes and averaged over examples (`kl_div(..., reduction='batchmean')`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def ensemble_kl(logits_list: Sequence[jax.Array] | jax.Array, temperature: float) -> jax.Array:
  """Per-peer KL to the peers' stop-gradient mean-logit ensemble: out[k] = tau^2 mean_n
  KL(softmax(sg(mean_j z_j) / tau) || softmax(z_k / tau)).

  Args:
    logits_list: K >= 2 arrays (n, classes), or one stacked (K, n, classes) array.
    temperature: tau > 0.
  Returns:
    (K,) losses, one per peer.
  """
  if hasattr(logits_list, 'ndim'):
    logits = jnp.asarray(logits_list)
  else:
    logits = jnp.stack([jnp.asarray(z) for z in logits_list])
  if logits.ndim != 3 or logits.shape[0] < 2:
    raise ValueError(
        f"ensemble_kl needs at least 2 peers' logits of shape (n, classes); got stacked "
        f'shape {logits.shape}'
    )
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  ensemble = jax.lax.stop_gradient(jnp.mean(logits, axis=0))  # (n, classes)
  log_target = jax.nn.log_softmax(ensemble / temperature, axis=-1)
  log_q = jax.nn.log_softmax(logits / temperature, axis=-1)  # (K, n, classes)
  kl = jnp.sum(jnp.exp(log_target) * (log_target - log_q), axis=-1)  # (K, n)
  return temperature**2 * jnp.mean(kl, axis=-1)
