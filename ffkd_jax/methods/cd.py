"""CD: Zhou, Zhuge, Guan, Liu, "Channel Distillation: Channel-Wise Attention for Knowledge
Distillation", arXiv:2006.01683, 2020; as wp502/SKD-RSL runs it (the code FFKD's paper was
compared with): zoo/CD.py, driven by train_one_epoch.py::train_distill and train_student.py.

  L_S = ce_weight CE(y, z_S) + kd_weight GKD(z_S, sg(z_T), y)
      + cd_weight(step) sum_k mean_{n,c} (GAP(e_k(V_k)) - GAP(sg(U_k)))^2

GKD is guided KD (KL on the examples the teacher classifies correctly, ffkd_jax/losses/cd.py);
U_k, V_k the teacher's and the student's stage maps; e_k the `Embed` of zoo/CD.py, a 1x1
convolution without bias and batch norm from the student's channels to the teacher's
(ConnectorHeads at the student's own spatial size, so nothing is pooled: the global average
pooling makes sizes irrelevant), a trainable head of the student. Stage pairs k: every stage
after the stem (train_distill's `feat[1:-1]`), deepest aligned (`aligned_stage_pairs`).

Weights, whose are whose: train_distill's `loss = args.alpha * loss_cls + args.beta * loss_div
+ args.gamma * loss_kd`, where for `--distill cd` loss_div is KDLossv2 (GKD) and loss_kd is
CDLoss; so ce_weight = the code's alpha, kd_weight = its beta, cd_weight = its gamma. (The
argparse help strings of train_student.py, copied from RepDistiller, describe alpha as the KD
weight and gamma as the classification weight; the code uses them as above.) Defaults
(`config.cd`): train_student.py's argument defaults, alpha 1, beta 1, gamma 1, kd_T 4,
cd_is_edt False, cd_loss_factor 0.9; that repository has no run script for cd, so these are its
CIFAR settings.

EDT (early decay teacher, `edt`, the code's cd_is_edt; `utils.adjust_loss_alpha`, CIFAR branch):
the CD weight times factor^e, e the number of boundaries passed (epochs 60 and 160 of the code's
200-epoch schedule). Here the boundaries are global steps, `edt_boundary_steps` = those epochs at
782 steps an epoch (CIFAR-100 at batch 64, as config.iekd.ae_steps is sized): 46920 and 125120.

Departures from the code, and why:
  - EDT: train_distill assigns `args.gamma = adjust_loss_alpha(args.gamma, ...)` at the start of
    every epoch, so the factor compounds (from epoch 60 on the weight shrinks by 0.9 every epoch,
    from 160 on by 0.81: 0.9^180, about 6e-9 of it, in the last epoch). Here the weight is
    cd_weight x factor^e, what adjust_loss_alpha computes from the initial weight (and what the
    CD paper describes as a gradual decay); with the default edt = False neither applies.
  - Pairs: the code takes exactly the last 4 of feat[1:-1] (`select_interlayer_amount(...,
    4)` asserts 4, so a 3-stage CIFAR ResNet fails there); here every aligned stage pair, or
    `layer_pairs`.
  - count = 0 (the teacher wrong on the whole batch) gives a GKD of 0 where the code gives NaN
    (ffkd_jax/losses/cd.py).
GKD is a ratio over the batch, so it is taken on the global batch (its count and sum over every
device's rows: the code's batch on its one GPU); CE and the CD term are per-example means, local.
The teacher is frozen and pre-trained.
"""

import jax
import jax.numpy as jnp

from ffkd_jax.losses.cd import channel_distillation_loss, guided_kd_loss
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import gather
from ffkd_jax.methods.common import TeacherStudent, check_positive, check_temperatures, check_weights
from ffkd_jax.methods.connectors import channel_embeddings
from ffkd_jax.methods.pairs import aligned_stage_pairs, pair_key, resolve_pairs
from ffkd_jax.parallel import DATA_AXIS


def check_boundary_steps(config, field: str) -> None:
  """Raises unless the dotted `field` is a tuple of increasing integer steps >= 0."""
  value = config
  for part in field.split('.'):
    value = value[part]
  try:
    steps = [int(b) for b in value]
    ok = all(s == b for s, b in zip(steps, value)) and all(s >= 0 for s in steps)
    ok = ok and all(a < b for a, b in zip(steps, steps[1:]))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(
        f'config.{field}={value!r} is not valid: give increasing integer global steps >= 0, '
        'e.g. (46920, 125120).'
    )


class CD(TeacherStudent):
  name = 'cd'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'cd.temperature')
    check_positive(config, 'cd.edt_factor')
    if config.cd.edt_factor > 1:
      raise ValueError(
          f'config.cd.edt_factor={config.cd.edt_factor!r} is not valid: the early-decay factor is '
          'in (0, 1].'
      )
    check_weights(config, 'cd.ce_weight', 'cd.kd_weight', 'cd.cd_weight')
    check_boundary_steps(config, 'cd.edt_boundary_steps')

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.cd
    self.ce_weight, self.kd_weight, self.cd_weight = c.ce_weight, c.kd_weight, c.cd_weight
    self.temperature = c.temperature
    self.edt, self.edt_factor = bool(c.edt), float(c.edt_factor)
    self.edt_boundary_steps = tuple(int(b) for b in c.edt_boundary_steps)
    self.layer_pairs = resolve_pairs(
        c.layer_pairs, 'cd.layer_pairs', feature_shapes, aligned_stage_pairs
    )

  def heads(self, role):
    if role != 'student':
      return None
    return channel_embeddings(self.feature_shapes, self.layer_pairs, DATA_AXIS)

  def cd_weight_at(self, step: jax.Array) -> jax.Array:
    """The CD weight at global step `step`: cd_weight, times edt_factor^(boundaries passed)
    with EDT."""
    weight = jnp.float32(self.cd_weight)
    if not self.edt:
      return weight
    passed = sum((step >= b).astype(jnp.float32) for b in self.edt_boundary_steps)
    return weight * jnp.float32(self.edt_factor) ** passed

  def _cd(self, outputs):
    total = 0.0
    for t_name, s_name in self.layer_pairs:
      student = outputs['student'].heads[pair_key((t_name, s_name))]  # (n, h_s, w_s, c_t)
      teacher = jax.lax.stop_gradient(outputs['teacher'].features[t_name])  # (n, h_t, w_t, c_t)
      total += channel_distillation_loss(student, teacher)
    return total

  def loss(self, outputs, labels, step):
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    kd, kd_metrics = guided_kd_loss(  # global batch: a sum over the correct examples / count
        gather(self.distillation_logits(student.logits)),
        gather(jax.lax.stop_gradient(self.distillation_logits(teacher.logits))),
        gather(labels),
        self.temperature,
    )
    cd = self._cd(outputs)
    cd_weight = self.cd_weight_at(step)
    total = self.ce_weight * ce + self.kd_weight * kd + cd_weight * cd
    return (
        {'student': total},
        {
            'loss/student_ce': ce,
            'loss/student_kd': kd,
            'loss/student_cd': cd,
            'cd/weight': cd_weight,
            'cd/teacher_correct': kd_metrics['teacher_correct'],
        },
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['cd/eval'] = jax.lax.pmean(self._cd(outputs), DATA_AXIS)
    return metrics
