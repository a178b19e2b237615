"""DKD: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022.

  L_S = ce_weight CE(y, z_S) + w(step) (alpha TCKD + beta NCKD)(z_S, sg(z_T), y)

with TCKD / NCKD the target-class and non-target-class parts of the softened KL
(ffkd_jax/losses/dkd.py) and w the warm-up ramp. Per example, so local batch means. The
teacher is frozen and pre-trained.

This follows megvii-research/mdistiller, mdistiller/distillers/DKD.py (`DKD.forward_train`).
Defaults (`config.dkd`), from mdistiller/engine/cfg.py (CFG.DKD): CE_WEIGHT 1.0, ALPHA 1.0,
BETA 8.0, T 4.0, WARMUP 20 epochs. BETA 8 is also what its resnet32x4 -> resnet8x4 config
(configs/cifar100/dkd/res32x4_res8x4.yaml) keeps; other pairs there override it (2 for
res56_res20 and res110_res32, 6 for wrn40_2_wrn_16_2 and vgg13_vgg8).

Departure: mdistiller scales the DKD term by min(epoch / WARMUP, 1) with a 1-based epoch, a
ramp that steps once an epoch; a method here knows the global step only, so the ramp is per step:
w(step) = min((step + 1) / warmup_steps, 1), with warmup_steps = 20 epochs of the CIFAR-100
protocol at batch 64 (20 x 782 = 15640 steps, sized as config.iekd.ae_steps is). Both reach 1
in the 20th epoch; the per-step ramp lies below mdistiller's staircase by less than 1/20 (at
step 0 it is 1/15640 where mdistiller's first epoch uses 1/20). warmup_steps = 1: no ramp.
"""

import jax

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.dkd import dkd_loss
from ffkd_jax.methods.common import (
    TeacherStudent,
    check_at_least,
    check_temperatures,
    check_weights,
    linear_warmup,
)


class DKD(TeacherStudent):
  name = 'dkd'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'dkd.temperature')
    check_weights(config, 'dkd.ce_weight', 'dkd.alpha', 'dkd.beta')
    check_at_least(config, 'dkd.warmup_steps', 1, 'the DKD ramp lasts this many steps (1: none); ')

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.dkd
    self.ce_weight, self.alpha, self.beta = c.ce_weight, c.alpha, c.beta
    self.temperature = c.temperature
    self.warmup_steps = int(c.warmup_steps)

  def warmup(self, step: jax.Array) -> jax.Array:
    """min((step + 1) / warmup_steps, 1): the weight of the DKD term at global step `step`."""
    return linear_warmup(step, self.warmup_steps)

  def loss(self, outputs, labels, step):
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    dkd = dkd_loss(
        self.distillation_logits(student.logits),
        jax.lax.stop_gradient(self.distillation_logits(teacher.logits)),
        labels,
        self.alpha,
        self.beta,
        self.temperature,
    )
    warmup = self.warmup(step)
    return (
        {'student': self.ce_weight * ce + warmup * dkd},
        {'loss/student_ce': ce, 'loss/student_dkd': dkd, 'dkd/warmup': warmup},
    )
