"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 workshop.

  L_S = ce_weight CE(y, z_S) + kd_weight tau^2 KL(sg(p_T^tau) || p_S^tau)

CIFAR-100 defaults (`config.kd`): tau = 4, CE weight 0.1, KD weight 0.9, from RepDistiller's
scripts/run_cifar_distill.sh (`--distill kd -r 0.1 -a 0.9 -b 0`, `--kd_T 4`); mdistiller's
KD.TEMPERATURE 4, KD.LOSS.CE_WEIGHT 0.1, KD.LOSS.KD_WEIGHT 0.9 are the same. The teacher is
frozen and pre-trained.
"""

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.common import TeacherStudent, check_temperatures


class KD(TeacherStudent):
  name = 'kd'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'kd.temperature')

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    self.temperature = config.kd.temperature
    self.ce_weight = config.kd.ce_weight
    self.kd_weight = config.kd.kd_weight

  def loss(self, outputs, labels, step):
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    kd = self.logit_kd(teacher.logits, student.logits, self.temperature)
    return (
        {'student': self.ce_weight * ce + self.kd_weight * kd},
        {'loss/student_ce': ce, 'loss/student_kd': kd},
    )
