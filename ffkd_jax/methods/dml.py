"""DML: Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018.

K >= 2 peers, all trained from scratch in the same step, each with its own optimizer:

  L_k = CE(y, z_k) + kl_weight / (K - 1) sum_{j != k} tau^2 KL(sg(p_j^tau) || p_k^tau)

(ffkd_jax/losses/mutual.py; per example, so local means). The roles are 'peer0'..'peer{K-1}',
built from `config.dml.models`, a comma-separated list of model names ('' = two copies of
`config.model`); `peer0` is the primary role (its accuracy is `eval/top1` and picks the best
checkpoint).

Defaults (`config.dml`): tau = 1 and KL weight 1, the paper's objective (and IE-KD's
config/DML/cifar100/*.yaml `kl_loss_weight: 1` with its DMLLoss at tau 1).

`config.dml.peer_updates`: 'synchronous' (the default) updates all peers from one forward pass
(as AberHu/Knowledge-Distillation-Zoo's DML does). 'alternating' updates them one after the
other within a step, peer k's phase reading the others as the phases before it left them (their
updated parameters) -- the order of the paper's Algorithm 1 and of IE-KD's processors/DML.py --
but reading them in inference mode (running batch-norm statistics), where IE-KD's code recomputes
both peers in training mode before each half-update; from scratch, running statistics lag, so
this is not the default. It costs K forward passes of each peer instead of one.
"""

import functools


import jax

from ffkd_jax import cka, models
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.mutual import mutual_kl
from ffkd_jax.methods.base import Method, Phase, Role, gather
from ffkd_jax.methods.common import check_temperatures, prediction_agreement


def peer_models(
    spec: str, default_model: str, field: str, count: int | None = None
) -> tuple[str, ...]:
  """'resnet8,resnet20' -> ('resnet8', 'resnet20'); '' -> two copies of `default_model`."""
  names = tuple(n.strip() for n in spec.split(',')) if spec.strip() else (default_model,) * 2
  valid = models.available_models()
  for name in names:
    if name not in valid:
      raise ValueError(
          f"config.{field}='{spec}': '{name}' is not a model; valid: " f"{', '.join(valid)}."
      )
  if count is not None and len(names) != count:
    raise ValueError(
        f"config.{field}='{spec}' names {len(names)} models; this method has "
        f'exactly {count} peers.'
    )
  if len(names) < 2:
    raise ValueError(
        f"config.{field}='{spec}' names {len(names)} model; mutual learning needs "
        "at least 2 peers, e.g. 'resnet8,resnet8'."
    )
  return names


def peer_name(index: int) -> str:
  return f'peer{index}'


def peer_diagnostics(outputs, num_peers: int) -> dict[str, jax.Array]:
  """peer0 against every other peer: top-1 agreement and linear CKA of the embeddings."""
  metrics = {}
  first = outputs[peer_name(0)]
  for j in range(1, num_peers):
    other = outputs[peer_name(j)]
    key = f'{peer_name(0)}-{peer_name(j)}'
    metrics.update(prediction_agreement(other.logits, first.logits, f'agreement/{key}'))
    if 'embedding' in first.features and 'embedding' in other.features:
      metrics[f'cka/{key}'] = cka.layer_cka(
          gather(first.features['embedding']), gather(other.features['embedding'])
      )
  return metrics


UPDATES = ('alternating', 'synchronous')


class DML(Method):
  name = 'dml'
  primary_role = 'peer0'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'dml.temperature')
    peer_models(config.dml.models, config.model, 'dml.models')
    if config.dml.peer_updates not in UPDATES:
      raise ValueError(
          f'config.dml.peer_updates={config.dml.peer_updates!r} is not valid; valid: {UPDATES}.'
      )

  @classmethod
  def make_roles(cls, config):
    models_ = peer_models(config.dml.models, config.model, 'dml.models')
    return tuple(Role(peer_name(k), model) for k, model in enumerate(models_))

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    self.num_peers = len(self.roles())
    self.temperature, self.kl_weight = config.dml.temperature, config.dml.kl_weight
    self.peer_updates = config.dml.peer_updates

  def phases(self):
    if self.peer_updates == 'synchronous':
      return super().phases()
    names = tuple(peer_name(k) for k in range(self.num_peers))
    return tuple(
        Phase(name, (name,), functools.partial(self.peer_loss, k), reads=names)
        for k, name in enumerate(names)
    )

  def peer_loss(self, k, outputs, labels, step):
    """Peer k's phase of the alternating update: its loss alone."""
    losses, metrics = self.loss(outputs, labels, step)
    name = peer_name(k)
    return {name: losses[name]}, {m: v for m, v in metrics.items() if m.startswith(f'loss/{name}_')}

  def loss(self, outputs, labels, step):
    del step
    logits = [outputs[peer_name(k)].logits for k in range(self.num_peers)]
    # (K,): peer k's KL to the others' fixed outputs
    kl = mutual_kl([self.distillation_logits(z) for z in logits], self.temperature)
    losses, metrics = {}, {}
    for k, peer_logits in enumerate(logits):
      ce = cross_entropy(peer_logits, labels)
      losses[peer_name(k)] = ce + self.kl_weight * kl[k]
      metrics[f'loss/{peer_name(k)}_ce'] = ce
      metrics[f'loss/{peer_name(k)}_kl'] = kl[k]
    return losses, metrics

  def diagnostics(self, outputs):
    return peer_diagnostics(outputs, self.num_peers)
