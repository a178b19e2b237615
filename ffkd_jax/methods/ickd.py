"""ICKD-C: Liu, Shao, Li, Zhang, Guo, Chen, "Exploring Inter-Channel Correlation for
Diversity-preserved Knowledge Distillation", ICCV 2021 (the classification variant).

  L_S = ce_weight CE(y, z_S) + kd_weight tau^2 KL(sg(p_T^tau) || p_S^tau)
      + ickd_weight sum_n ||G(r(V_S))_n - G(U_T)_n||_F^2 / (c n)

with G the per-example, row-normalised c x c channel correlation of a map
(ffkd_jax/losses/ickd.py), U_T the teacher's last stage output and r a 1x1 conv + batch norm
connector (ConnectorHeads, a trainable head of the student) from the student's last stage to
the teacher's channel count. The correlation is over spatial positions, so the student's map
keeps its own spatial size. Per example: a local mean, nothing gathered.

Defaults (`config.ickd`): ickd_weight 2.5 with KD (tau 4, weight 1) and CE (weight 1), on the
last stage (the ICKD-C CIFAR-100 scripts, `-r 1 -a 1 -b 2.5`, as ffkd_jax/losses/ickd.py
records them from third-party copies; the official repository was not available to check).
The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.ickd import ickd_loss
from ffkd_jax.methods.common import TeacherStudent, check_temperatures
from ffkd_jax.methods.pairs import last_stage_pair, pair_key, resolve_pairs
from ffkd_jax.methods.connectors import ConnectorHeads
from ffkd_jax.parallel import DATA_AXIS


class ICKD(TeacherStudent):
  name = 'ickd'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'ickd.temperature')

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.ickd
    self.ce_weight, self.kd_weight, self.ickd_weight = c.ce_weight, c.kd_weight, c.ickd_weight
    self.temperature = c.temperature
    self.layer_pairs = resolve_pairs(
        c.layer_pairs, 'ickd.layer_pairs', feature_shapes, last_stage_pair
    )

  def heads(self, role):
    if role != 'student':
      return None
    pairs = []
    for pair in self.layer_pairs:
      t_name, s_name = pair
      h, w = self.feature_shapes['student'][s_name].shape[1:3]  # no pooling: the student's size
      channels = self.feature_shapes['teacher'][t_name].shape[-1]
      pairs.append((pair_key(pair), s_name, (h, w, channels)))
    return ConnectorHeads(tuple(pairs), axis_name=DATA_AXIS)

  def _ickd(self, outputs):
    total = 0.0
    for t_name, s_name in self.layer_pairs:
      student = outputs['student'].heads[pair_key((t_name, s_name))]  # (n, h_s, w_s, c_t)
      teacher = jax.lax.stop_gradient(outputs['teacher'].features[t_name])  # (n, h_t, w_t, c_t)
      total += ickd_loss(student, teacher)
    return total

  def loss(self, outputs, labels, step):
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    kd = self.logit_kd(teacher.logits, student.logits, self.temperature)
    ickd = self._ickd(outputs)
    total = self.ce_weight * ce + self.kd_weight * kd + self.ickd_weight * ickd
    return (
        {'student': total},
        {'loss/student_ce': ce, 'loss/student_kd': kd, 'loss/student_ickd': ickd},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['ickd/eval'] = jax.lax.pmean(self._ickd(outputs), DATA_AXIS)
    return metrics
