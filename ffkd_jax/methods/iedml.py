"""IE-DML: inheritance and exploration applied to deep mutual learning (Huang et al., CVPR 2021,
"Revisiting Knowledge Distillation: An Inheritance and Exploration Framework", which reports
that applying IE-KD to the training of two networks improves both over DML).

The paper's own description of IE-DML could not be found (its full text was not available here,
and the official code, aliyun/Revisiting-Knowledge-Distillation-an-Inheritance-and-Exploration-
Framework, has DML and IE-KD processors but no IE-DML one). This is therefore this project's
extension, the symmetric one: each of the two peers is both a "teacher" and a "student" of
IE-KD (ffkd_jax/methods/iekd.py) for the other, on top of DML (ffkd_jax/methods/dml.py):

  peer k (j = the other peer), trained from scratch, with heads on its last stage output F_k:
    - an auto-encoder on sg(F_k), whose code C_k = enc_k(sg(F_k)) is what peer j inherits from
      and explores away from (L1 reconstruction; the stop-gradient keeps it off the backbone);
    - inheritance and exploration encoders of F_k's two channel halves.
  L_k = CE(y, z_k) + kl_weight tau^2 KL(sg(p_j) || p_k) + rec_weight mean|sg(F_k) - dec_k(C_k)|
      + [step >= ae_steps] (inh_weight D(enc_I,k(F_k[:c/2]), sg(C_j))
                            - exp_weight D(enc_E,k(F_k[c/2:]), sg(C_j)))

Unlike IE-KD's fixed teacher auto-encoder, each auto-encoder keeps training (its peer's features
keep changing); the inheritance and exploration terms start at `ae_steps`, once the codes mean
something. Two peers exactly; `peer0` is the primary role.

Defaults (`config.iedml`): the IE-KD defaults (weights 1 and 1, code channels half of the smaller
peer's last-stage channels, natural 50/50 split, ae_steps 23460 = 30 CIFAR-100 epochs at batch
64) and the DML ones (tau 1, KL weight 1); reconstruction weight 1 (IE-KD's RecLoss). `models`
'' = two copies of `config.model`.
"""

import jax
import jax.numpy as jnp

from ffkd_jax.losses import iekd as ie_losses
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.mutual import mutual_kl
from ffkd_jax.methods.base import Method, Role
from ffkd_jax.methods.common import check_at_least, check_temperatures, common_size, spatial_size
from ffkd_jax.methods.pairs import last_stage
from ffkd_jax.methods.dml import peer_diagnostics, peer_models, peer_name
from ffkd_jax.methods.iekd import IEHeads, ie_terms
from ffkd_jax.parallel import DATA_AXIS

NUM_PEERS = 2


class IEDML(Method):
  name = 'iedml'
  primary_role = 'peer0'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'iedml.temperature')
    peer_models(config.iedml.models, config.model, 'iedml.models', count=NUM_PEERS)
    check_at_least(config, 'iedml.ae_steps', 0)

  @classmethod
  def make_roles(cls, config):
    models_ = peer_models(config.iedml.models, config.model, 'iedml.models', count=NUM_PEERS)
    return tuple(Role(peer_name(k), model) for k, model in enumerate(models_))

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.iedml
    self.models = tuple(role.model for role in self.roles())
    self.temperature, self.kl_weight = c.temperature, c.kl_weight
    self.rec_weight, self.inh_weight, self.exp_weight = c.rec_weight, c.inh_weight, c.exp_weight
    self.ae_steps = int(c.ae_steps)
    features, channels = {}, []
    for k in range(NUM_PEERS):
      shapes = feature_shapes[peer_name(k)]
      features[peer_name(k)] = last_stage(shapes)
      channels.append(shapes[features[peer_name(k)]].shape[-1])
    self.features = features  # peer -> the feature its heads read
    sizes = [spatial_size(feature_shapes[peer][name]) for peer, name in features.items()]
    common_size(sizes[0], sizes[1], f'config.iedml.models={",".join(self.models)}')
    if min(channels) < 2:
      raise ValueError(
          "iedml: a peer's last stage has one channel; it cannot be split into "
          'inheritance and exploration halves.'
      )
    self.code_channels = c.code_channels if c.code_channels > 0 else max(1, min(channels) // 2)

  def required_features(self):
    return {peer: (feature,) for peer, feature in self.features.items()}

  def heads(self, role):
    return IEHeads(
        self.features[role],
        self.code_channels,
        autoencoder=True,
        encoders=True,
        axis_name=DATA_AXIS,
    )

  def _terms(self, outputs):
    """Per peer: (reconstruction, inheritance, exploration), ungated."""
    terms = {}
    for k in range(NUM_PEERS):
      own, other = outputs[peer_name(k)], outputs[peer_name(1 - k)]
      source = jax.lax.stop_gradient(own.features[self.features[peer_name(k)]])
      reconstruction = ie_losses.autoencoder_reconstruction_loss(
          source, own.heads['reconstruction']
      )
      terms[peer_name(k)] = (reconstruction, *ie_terms(own.heads, other.heads['code']))
    return terms

  def loss(self, outputs, labels, step):
    logits = [outputs[peer_name(k)].logits for k in range(NUM_PEERS)]
    kl = mutual_kl([self.distillation_logits(z) for z in logits], self.temperature)  # (2,)
    ie_on = step >= self.ae_steps
    losses, metrics = {}, {'iedml/active': ie_on.astype(jnp.float32)}
    for k, (reconstruction, inherit, explore) in enumerate(self._terms(outputs).values()):
      peer = peer_name(k)
      ce = cross_entropy(logits[k], labels)
      inherit = jnp.where(ie_on, inherit, 0.0)
      explore = jnp.where(ie_on, explore, 0.0)
      losses[peer] = (
          ce
          + self.kl_weight * kl[k]
          + self.rec_weight * reconstruction
          + self.inh_weight * inherit
          + self.exp_weight * explore
      )
      metrics.update(
          {
              f'loss/{peer}_ce': ce,
              f'loss/{peer}_kl': kl[k],
              f'loss/{peer}_reconstruction': reconstruction,
              f'loss/{peer}_inheritance': inherit,
              f'loss/{peer}_exploration': explore,
          }
      )
    return losses, metrics

  def diagnostics(self, outputs):
    local = {}
    for peer, (reconstruction, inherit, explore) in self._terms(outputs).items():
      local.update(
          {
              f'iedml/{peer}_reconstruction': reconstruction,
              f'iedml/{peer}_inheritance': inherit,
              f'iedml/{peer}_exploration': explore,
          }
      )
    # Per-example means: their mean over devices is the global batch's.
    return {**peer_diagnostics(outputs, NUM_PEERS), **jax.lax.pmean(local, DATA_AXIS)}
