"""IE-KD: Huang, Shen, Xing, Liu, Tian, Li, Deng, Huang, Hua, "Revisiting Knowledge
Distillation: An Inheritance and Exploration Framework", CVPR 2021.

The teacher's last stage output U (n, h, w, c_T) is compressed by an auto-encoder into a code
(its "factors"); the student's last stage output V is split along channels into an inheritance
half and an exploration half, each mapped by its own encoder into the code space:

  phase 1, steps [0, ae_steps): the teacher's auto-encoder alone (its backbone frozen):
    L_T = mean |U - dec(enc(U))|                                           (L1 reconstruction)
  phase 2, from ae_steps on: the student (backbone and its two encoder heads), the auto-encoder
    read in inference mode:
    L_S = ce_weight CE(y, z_S) + inh_weight D(enc_I(V[..., :c/2]), sg(enc(U)))   (inheritance)
                               - exp_weight D(enc_E(V[..., c/2:]), sg(enc(U)))   (exploration)

with D the factor-transfer distance (mean |a/||a|| - b/||b|||, ffkd_jax/losses/iekd.py). The
student's whole schedule (`num_epochs` / `num_train_steps`, its learning-rate schedule from its
start) follows the auto-encoder's `ae_steps`: the run is ae_steps longer
(`steps_before_schedule`), and the auto-encoder trains at the schedule's first ae_steps rates.
Both phases are `Phase`s of the method, and role windows say when each runs.

This follows the official code (aliyun/Revisiting-Knowledge-Distillation-an-Inheritance-and-
Exploration-Framework; in its processors/IE_KD.py the roles are named the other way round: the
pre-trained network is `student`, the one trained is `teacher`):
  - auto-encoder (model/auto_encoder.py): encoder and decoder of three 3x3 conv + BN +
    LeakyReLU(0.1) each, preceded by a LeakyReLU; code channels = half the teacher's channels
    (config/ie_kd.yaml: cin 64, cout 32); trained with L1 (RecLoss) for 30 epochs
    (`num_epoch_embedS: 30`) before the student, then used in eval mode;
  - the student's halves: `divide: natural` (first half inherits, second explores), each half
    through its own encoder of the same form (embedTI / embedTE, cin = cout = 32);
  - inheritance = FTLoss(p=1), exploration = -FTLoss (NormLoss(negative=True)), weights 1 and 1
    (`inh_loss_weight_decay: base: 1`, `exp_loss_weight_decay: base: 1`), CE weight 1;
  - the features are the last stage's output.
Defaults (`config.iekd`): those values; ae_steps = 23460 = 30 epochs of the CIFAR-100 protocol
(50,000 images, batch 64: 782 steps an epoch). The paper's full text was not available here to
check; a third-party summary of it reports a 50/50 split and lambda_inh = lambda_exp = 50 as the
best setting of its ablation, which differs from the released config's 1 and 1.

As the official code does it: the auto-encoder first (its batch norm with batch statistics of
the global batch), then the student's whole schedule with the auto-encoder fixed in inference
mode (running averages). (Before 2026-12-01 the student trained with CE alone during the
auto-encoder's steps, inside its own schedule.) The auto-encoder's optimizer is the run's
(SGD at the schedule's rate), where the official code gives it its own.
"""

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax

from ffkd_jax.losses import iekd as ie_losses
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import Phase
from ffkd_jax.methods.common import (
    TeacherStudent,
    check_at_least,
    common_size,
    pool_to_smaller,
    spatial_size,
    teacher_student_roles,
)
from ffkd_jax.methods.pairs import check_names, last_stage
from ffkd_jax.parallel import DATA_AXIS

# PyTorch's normal_(0, sqrt(2 / (k * k * out_channels))) of model/auto_encoder.py ('normal' is
# the untruncated normal).
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _leaky_relu(x):
  return nn.leaky_relu(x, negative_slope=0.1)


class Coder(nn.Module):
  """LeakyReLU, then three 3x3 conv + batch norm + LeakyReLU(0.1): c_in -> c_in -> c_out ->
  c_out (the official auto-encoder's `Coder`). (n, h, w, c_in) -> (n, h, w, c_out)."""

  out_channels: int
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _leaky_relu(x)
    for i, channels in enumerate((x.shape[-1], self.out_channels, self.out_channels)):
      x = nn.Conv(
          channels, (3, 3), padding=1, use_bias=False, kernel_init=_CONV_INIT, name=f'conv{i}'
      )(x)
      x = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          epsilon=1e-5,
          axis_name=self.axis_name,
          name=f'bn{i}',
      )(x)
      x = _leaky_relu(x)
    return x


class IEHeads(nn.Module):
  """The inheritance-and-exploration extras of one role, on its feature `feature`.

  autoencoder: an auto-encoder on sg(feature) -> {'code', 'reconstruction'} (the code is what
    the other side inherits from or explores away from; stop-gradient input, so that the
    reconstruction trains the auto-encoder only).
  encoders: the inheritance and exploration encoders of the feature's two channel halves ->
    {'inheritance_code', 'exploration_code'}.
  """

  feature: str
  code_channels: int
  autoencoder: bool
  encoders: bool
  axis_name: str | None = None

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool) -> dict[str, jax.Array]:
    x = features[self.feature]  # (n, h, w, c)
    out = {}
    if self.autoencoder:
      source = jax.lax.stop_gradient(x)
      code = Coder(self.code_channels, self.axis_name, name='encoder')(source, train)
      out['code'] = code  # (n, h, w, code_channels)
      out['reconstruction'] = Coder(x.shape[-1], self.axis_name, name='decoder')(code, train)
    if self.encoders:
      half = x.shape[-1] // 2
      out['inheritance_code'] = Coder(
          self.code_channels, self.axis_name, name='inheritance_encoder'
      )(x[..., :half], train)
      out['exploration_code'] = Coder(
          self.code_channels, self.axis_name, name='exploration_encoder'
      )(x[..., half:], train)
    return out


def ie_terms(student_heads, target_code: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(inheritance, exploration) losses of one side's encoder codes against sg(target_code)."""
  target = jax.lax.stop_gradient(target_code)
  inherit, target_i = pool_to_smaller(student_heads['inheritance_code'], target)
  explore, target_e = pool_to_smaller(student_heads['exploration_code'], target)
  return (
      ie_losses.inheritance_loss(inherit, target_i),
      ie_losses.exploration_loss(explore, target_e),
  )


class IEKD(TeacherStudent):
  name = 'iekd'

  @classmethod
  def check_config(cls, config):
    check_at_least(
        config, 'iekd.ae_steps', 1, 'the auto-encoder trains for the first ae_steps steps, so '
    )

  @classmethod
  def steps_before_schedule(cls, config):
    return int(config.iekd.ae_steps)

  @classmethod
  def make_roles(cls, config):
    # The teacher role (its frozen backbone and its auto-encoder head) is updated for the first
    # ae_steps steps only; the student from then on, its schedule starting then.
    teacher, student = teacher_student_roles(config)
    ae_steps = int(config.iekd.ae_steps)
    return (
        dataclasses.replace(teacher, stop_step=ae_steps),
        dataclasses.replace(student, start_step=ae_steps, schedule_start=ae_steps),
    )

  def phases(self):
    return (
        Phase('autoencoder', ('teacher',), self.autoencoder_loss),
        Phase('student', ('student',), self.student_loss, reads=('teacher',)),
    )

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.iekd
    self.ce_weight, self.inh_weight, self.exp_weight = c.ce_weight, c.inh_weight, c.exp_weight
    self.ae_steps = int(c.ae_steps)
    teacher, student = feature_shapes['teacher'], feature_shapes['student']
    self.teacher_feature = c.teacher_feature or last_stage(teacher)
    self.student_feature = c.student_feature or last_stage(student)
    check_names(teacher, 'teacher', (self.teacher_feature,), 'iekd.teacher_feature')
    check_names(student, 'student', (self.student_feature,), 'iekd.student_feature')
    teacher_channels = teacher[self.teacher_feature].shape[-1]
    self.code_channels = c.code_channels if c.code_channels > 0 else max(1, teacher_channels // 2)
    common_size(
        spatial_size(teacher[self.teacher_feature]),
        spatial_size(student[self.student_feature]),
        f'config.iekd teacher {self.teacher_feature} / student {self.student_feature}',
    )
    if student[self.student_feature].shape[-1] < 2:
      raise ValueError(
          f'iekd: the student feature {self.student_feature} has one channel; it '
          'cannot be split into inheritance and exploration halves.'
      )

  def required_features(self):
    return {'teacher': (self.teacher_feature,), 'student': (self.student_feature,)}

  def heads(self, role):
    if role == 'teacher':
      return IEHeads(
          self.teacher_feature,
          self.code_channels,
          autoencoder=True,
          encoders=False,
          axis_name=DATA_AXIS,
      )
    return IEHeads(
        self.student_feature,
        self.code_channels,
        autoencoder=False,
        encoders=True,
        axis_name=DATA_AXIS,
    )

  def _reconstruction(self, teacher) -> jax.Array:
    source = jax.lax.stop_gradient(teacher.features[self.teacher_feature])
    return ie_losses.autoencoder_reconstruction_loss(source, teacher.heads['reconstruction'])

  def autoencoder_loss(self, outputs, labels, step):
    """Phase 1: the auto-encoder's L1 reconstruction of the teacher's feature."""
    del labels, step
    reconstruction = self._reconstruction(outputs['teacher'])
    return {'teacher': reconstruction}, {'loss/teacher_reconstruction': reconstruction}

  def student_loss(self, outputs, labels, step):
    """Phase 2: CE, inheritance and exploration against the fixed auto-encoder's code."""
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    inherit, explore = ie_terms(student.heads, teacher.heads['code'])
    loss_student = self.ce_weight * ce + self.inh_weight * inherit + self.exp_weight * explore
    return (
        {'student': loss_student},
        {
            'loss/student_ce': ce,
            'loss/student_inheritance': inherit,
            'loss/student_exploration': explore,
        },
    )

  def diagnostics(self, outputs):
    teacher, student = outputs['teacher'], outputs['student']
    inherit, explore = ie_terms(student.heads, teacher.heads['code'])
    local = {
        'iekd/reconstruction': self._reconstruction(teacher),
        'iekd/inheritance': inherit,
        'iekd/exploration': explore,
    }
    # Per-example means: their mean over devices is the global batch's.
    return {**super().diagnostics(outputs), **jax.lax.pmean(local, DATA_AXIS)}
