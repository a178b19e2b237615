"""CC: Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang, "Correlation Congruence for Knowledge
Distillation", ICCV 2019.

  L_S = ce_weight CE(y, z_S) + kd_weight tau^2 KL(sg(p_T^tau) || p_S^tau)
      + cc_weight L_CC(e_S, e_T)

L_CC compares the Taylor-approximated Gaussian-RBF correlation matrices of the two networks'
pooled `embedding`s over the batch (ffkd_jax/losses/cc.py), so it is taken on the global batch;
CE and KD are local means.

Defaults (`config.cc`): one source, AberHu/Knowledge-Distillation-Zoo, the implementation whose
kernel form ffkd_jax/losses/cc.py follows: its example_train_script.sh `--kd_mode cc --lambda_kd
100.0 --gamma 0.4 --P_order 2` and train_kd.py's objective CE + lambda_kd L_CC, so CE weight 1,
cc_weight 100, gamma 0.4, P = 2, and no logit KD (kd_weight 0; tau 4 is used only if it is set).
(Before 2026-12-01 kd_weight was 1, RepDistiller's convention for a method combined with KD,
mixed into KD-Zoo's weights.) RepDistiller's `correlation` (beta 0.02 on 128-d linear embeddings
of both networks) is a different, author-emailed form and its weight does not carry over.
The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.cc import cc_loss
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import gather
from ffkd_jax.methods.common import TeacherStudent, check_temperatures

FEATURE = 'embedding'


class CC(TeacherStudent):
  name = 'cc'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'cc.temperature')

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.cc
    self.ce_weight, self.kd_weight, self.cc_weight = c.ce_weight, c.kd_weight, c.cc_weight
    self.temperature, self.gamma, self.order = c.temperature, c.gamma, c.order

  def required_features(self):
    return {'teacher': (FEATURE,), 'student': (FEATURE,)}

  def _cc(self, outputs):
    student = gather(outputs['student'].features[FEATURE])  # (n_global, d_s)
    teacher = gather(jax.lax.stop_gradient(outputs['teacher'].features[FEATURE]))
    return cc_loss(student, teacher, self.gamma, self.order)

  def loss(self, outputs, labels, step):
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    kd = self.logit_kd(teacher.logits, student.logits, self.temperature)
    cc = self._cc(outputs)
    total = self.ce_weight * ce + self.kd_weight * kd + self.cc_weight * cc
    return (
        {'student': total},
        {'loss/student_ce': ce, 'loss/student_kd': kd, 'loss/student_cc': cc},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['cc/eval'] = self._cc(outputs)
    return metrics
