"""DIST: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022.

  L_S = ce_weight CE(y, z_S) + kd_weight tau^2 (beta inter(Y_S, Y_T) + gamma intra(Y_S, Y_T))

with Y = softmax(z / tau) (see ffkd_jax/losses/dist.py). The intra-class relation correlates
each class's probabilities over the batch, so the DIST term is taken on the global batch
(logits gathered over the data axis); the cross-entropy stays a local batch mean.

CIFAR-100 defaults (`config.dist`): tau = 4, beta = gamma = 1, KD weight 2, CE weight 1: the
official code's CIFAR-100 setting (hunto/DIST_KD, kd method `dist_t4`, KD loss weight 2), as
ffkd_jax/losses/dist.py records it. The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.dist import dist_loss
from ffkd_jax.methods.base import gather
from ffkd_jax.methods.common import TeacherStudent, check_temperatures


class DIST(TeacherStudent):
  name = 'dist'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'dist.temperature')

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.dist
    self.temperature, self.beta, self.gamma = c.temperature, c.beta, c.gamma
    self.ce_weight, self.kd_weight = c.ce_weight, c.kd_weight

  def _dist(self, student_logits, teacher_logits):
    return dist_loss(
        gather(self.distillation_logits(student_logits)),
        gather(jax.lax.stop_gradient(self.distillation_logits(teacher_logits))),
        self.temperature,
        self.beta,
        self.gamma,
    )

  def loss(self, outputs, labels, step):
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    kd = self._dist(student.logits, teacher.logits)  # global batch
    return (
        {'student': self.ce_weight * ce + self.kd_weight * kd},
        {'loss/student_ce': ce, 'loss/student_dist': kd},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['dist/eval'] = self._dist(outputs['student'].logits, outputs['teacher'].logits)
    return metrics
