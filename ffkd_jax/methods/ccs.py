"""CCS: Li et al., "Knowledge Distillation via Channel Correlation Structure", KSEM 2021; as
wp502/SKD-RSL runs it (the code FFKD's paper was compared with): train_student.py builds
`CCSLoss_2` of zoo/CCS_2.py, train_one_epoch.py::train_distill drives it.

  L_S = ce_weight CE(y, z_S) + kd_weight tau^2 KL(sg(p_T^tau) || p_S^tau)
      + ccs_weight sum_k L_CCS(e_k(V_k), sg(U_k))

L_CCS the channel- and example-distance structures of ffkd_jax/losses/ccs.py; U_k, V_k the
teacher's and the student's stage maps; e_k the `Embed` of zoo/CCS_2.py, a 1x1 convolution
without bias and batch norm from the student's channels to the teacher's, a trainable head of
the student (train_student.py adds the embeds to its trainable list); the student's map keeps
its spatial size. Stage pairs k: every stage after the stem (train_distill's `feat[1:-1]`),
deepest aligned (`aligned_stage_pairs`).

Weights, whose are whose: train_distill's `loss = args.alpha * loss_cls + args.beta * loss_div
+ args.gamma * loss_kd`, where for `--distill ccs` loss_div is DistillKL(kd_T) (zoo/KD.py:
batchmean KL x T^2) and loss_kd = sum(loss_group), the per-pair CCS losses; so ce_weight = the
code's alpha, kd_weight = its beta, ccs_weight = its gamma. Defaults (`config.ccs`):
train_student.py's argument defaults, alpha 1, beta 1, gamma 1, kd_T 4 (that repository has no
run script for ccs, so these are its CIFAR settings).

Both CCS structures are statistics of the batch, so they are taken on the global batch (every
device's rows): the code's batch on its one GPU. CE and KD are local means.

Departures from the code, and why:
  - Pairs: the code takes exactly the last 4 of feat[1:-1] (`select_interlayer_amount(...,
    4)` asserts 4, so a 3-stage CIFAR ResNet fails there); here every aligned stage pair, or
    `layer_pairs`.
  - zoo/CCS.py, the older variant, maps a student map whose channels differ through a
    `ConvReg` created afresh (random, untrained) at every call; CCS_2's trained embeds are what
    train_student.py uses, and what this follows.
The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.ccs import ccs_loss
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import gather
from ffkd_jax.methods.common import TeacherStudent, check_temperatures, check_weights
from ffkd_jax.methods.connectors import channel_embeddings
from ffkd_jax.methods.pairs import aligned_stage_pairs, pair_key, resolve_pairs
from ffkd_jax.parallel import DATA_AXIS


class CCS(TeacherStudent):
  name = 'ccs'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'ccs.temperature')
    check_weights(config, 'ccs.ce_weight', 'ccs.kd_weight', 'ccs.ccs_weight')

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.ccs
    self.ce_weight, self.kd_weight, self.ccs_weight = c.ce_weight, c.kd_weight, c.ccs_weight
    self.temperature = c.temperature
    self.layer_pairs = resolve_pairs(
        c.layer_pairs, 'ccs.layer_pairs', feature_shapes, aligned_stage_pairs
    )

  def heads(self, role):
    if role != 'student':
      return None
    return channel_embeddings(self.feature_shapes, self.layer_pairs, DATA_AXIS)

  def _ccs(self, outputs):
    """The summed per-pair CCS losses, on the global batch."""
    total = 0.0
    for t_name, s_name in self.layer_pairs:
      student = gather(outputs['student'].heads[pair_key((t_name, s_name))])  # (n, h_s, w_s, c_t)
      teacher = gather(jax.lax.stop_gradient(outputs['teacher'].features[t_name]))
      total += ccs_loss(student, teacher)
    return total

  def loss(self, outputs, labels, step):
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    kd = self.logit_kd(teacher.logits, student.logits, self.temperature)
    ccs = self._ccs(outputs)
    total = self.ce_weight * ce + self.kd_weight * kd + self.ccs_weight * ccs
    return (
        {'student': total},
        {'loss/student_ce': ce, 'loss/student_kd': kd, 'loss/student_ccs': ccs},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['ccs/eval'] = self._ccs(outputs)
    return metrics
