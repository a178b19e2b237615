"""KDCL: Guo et al., "Online Knowledge Distillation via Collaborative Learning", CVPR 2020.

K >= 2 peers trained from scratch together, each taught by their ensemble (losses/kdcl.py):

  L_k = alpha CE(y, z_k) + gamma tau^2 KL(p(sg(mean_j z_j) / tau) || p(z_k / tau))

As wp502/SKD-RSL runs it in the comparison FFKD's paper reports (train_one_epoch.py, the online
loop with `distill == 'kdcl'`: every peer's forward pass, `stable_out = outputs.mean(0).detach()`,
then each peer's `alpha * CE + gamma * KDCLLoss`; zoo/KDCL.py): the ensemble is the mean of the
peers' logits, all peers see the same batch and are updated from that one forward pass (one
phase here). Defaults (`config.kdcl`), from train_online.py's arguments: alpha 1, gamma 1,
tau (kd_T) 4. The peers are 'peer0'..'peer{K-1}' from `config.kdcl.models` ('' = two copies of
`config.model`); `peer0` is the primary role.

Departures: the paper's KDCL also feeds each peer its own augmentation of the image and offers
other ensembles (MinLogit, General, Linear); the code FFKD was compared with uses neither, and
nor does this.
"""

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.kdcl import ensemble_kl
from ffkd_jax.methods.base import Method, Role
from ffkd_jax.methods.common import check_temperatures, check_weights
from ffkd_jax.methods.dml import peer_diagnostics, peer_models, peer_name


class KDCL(Method):
  name = 'kdcl'
  primary_role = 'peer0'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'kdcl.temperature')
    check_weights(config, 'kdcl.alpha', 'kdcl.gamma')
    peer_models(config.kdcl.models, config.model, 'kdcl.models')

  @classmethod
  def make_roles(cls, config):
    models_ = peer_models(config.kdcl.models, config.model, 'kdcl.models')
    return tuple(Role(peer_name(k), model) for k, model in enumerate(models_))

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.kdcl
    self.num_peers = len(self.roles())
    self.alpha, self.gamma, self.temperature = c.alpha, c.gamma, c.temperature

  def loss(self, outputs, labels, step):
    del step
    logits = [outputs[peer_name(k)].logits for k in range(self.num_peers)]
    kl = ensemble_kl([self.distillation_logits(z) for z in logits], self.temperature)  # (K,)
    losses, metrics = {}, {}
    for k, peer_logits in enumerate(logits):
      ce = cross_entropy(peer_logits, labels)
      losses[peer_name(k)] = self.alpha * ce + self.gamma * kl[k]
      metrics[f'loss/{peer_name(k)}_ce'] = ce
      metrics[f'loss/{peer_name(k)}_kl'] = kl[k]
    return losses, metrics

  def diagnostics(self, outputs):
    return peer_diagnostics(outputs, self.num_peers)
