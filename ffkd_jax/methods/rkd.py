"""RKD: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019.

  L_S = ce_weight CE(y, z_S) + distance_weight L_D(e_S, e_T) + angle_weight L_A(e_S, e_T)

on the pooled `embedding` of each network (the vector fed to the classifier, RepDistiller's
`feat[-1]`). Distances and angles relate examples to each other, so both terms are taken on the
global batch (embeddings gathered over the data axis); the cross-entropy is a local mean.

CIFAR-100 defaults (`config.rkd`): distance weight 25, angle weight 50 (the paper, and
RepDistiller's RKDLoss(w_d=25, w_a=50)), CE weight 1 and no logit KD (RepDistiller's
scripts/run_cifar_distill.sh: `--distill rkd -a 0 -b 1`). The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.rkd import rkd_loss
from ffkd_jax.methods.base import gather
from ffkd_jax.methods.common import TeacherStudent

FEATURE = 'embedding'


class RKD(TeacherStudent):
  name = 'rkd'

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.rkd
    self.ce_weight, self.distance_weight, self.angle_weight = (
        c.ce_weight,
        c.distance_weight,
        c.angle_weight,
    )

  def required_features(self):
    return {'teacher': (FEATURE,), 'student': (FEATURE,)}

  def _rkd(self, outputs):
    student = gather(outputs['student'].features[FEATURE])  # (n_global, d_s)
    teacher = gather(jax.lax.stop_gradient(outputs['teacher'].features[FEATURE]))
    return rkd_loss(student, teacher)

  def loss(self, outputs, labels, step):
    del step
    ce = cross_entropy(outputs['student'].logits, labels)
    distance, angle = self._rkd(outputs)
    total = self.ce_weight * ce + self.distance_weight * distance + self.angle_weight * angle
    return (
        {'student': total},
        {
            'loss/student_ce': ce,
            'loss/student_rkd_distance': distance,
            'loss/student_rkd_angle': angle,
        },
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['rkd_distance/eval'], metrics['rkd_angle/eval'] = self._rkd(outputs)
    return metrics
