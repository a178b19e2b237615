"""SOKD: Liu, Liu, Huang, "Semi-Online Knowledge Distillation", BMVC 2021.

As its authors' code does it (swlzq/Semi-Online-KD; file names below are that repository's). The
pre-trained teacher T stays frozen; a trainable auxiliary branch A, a second copy of the
teacher's last stage and classifier (models/wrn.py: `auxiliary_block = deepcopy(block3)`,
`auxiliary_bn1`, `auxiliary_fc`; `auxiliary_forward`), reads the teacher's output of its
second-to-last stage, detached (trainer/sokd.py: `auxiliary_index = -3`, i.e. block2's output of
`[f0, f1, f2, f3, f4]`, `feature_T[-3].detach()`). A and the student S learn from each other,
and A also from T, from one forward pass and one backward pass of the summed losses
(trainer/sokd.py `train`, `calculate_kd`; ffkd_jax/losses/sokd.py):

  L_A = branch_ce_weight CE(y, z_A) + branch_kd_teacher_weight tau^2 KL(sg(p_T) || p_A)
        + branch_kd_student_weight tau^2 KL(sg(p_S) || p_A)
  L_S = ce_weight CE(y, z_S) + kd_weight tau^2 KL(sg(p_A) || p_S)

Here A is the teacher role's head (`AuxiliaryBranch`): the teacher's backbone has no optimizer
and runs in inference mode, its features reach the branch stop-gradient, and the branch trains
with the teacher role's optimizer (the run's, at `branch_lr_scale` times its schedule). The
student's accuracy is the result (`eval/top1`); A's training accuracy is `train/branch_top1`,
its top-1 agreement with the student and the teacher are diagnostics. The last stage and
classifier run as `ffkd_jax.models.create_tail` (CIFAR ResNets and WRNs: `stage2` feeds stage 3).

Defaults (`config.sokd`), from configs/sokd.yaml (the authors' CIFAR-100 run, WRN-40-2 -> WRN-40-1):
lambda_ce, lambda_kd, auxiliary_lambda_ce, auxiliary_lambda_kd_t, auxiliary_lambda_kd_s all 1;
lr_auxiliary 0.1 with lr 0.1, so `branch_lr_scale` 1 (trainer/sokd.py's own fallback, 0.05, is
overridden there); one SGD for S and A (momentum 0.9, weight decay 5e-4, the same MultiStepLR);
tau 4 (trainer/sokd.py `SoftTarget(T=4)`, fixed in the code). `branch_init` 'random': the
branch's initial weights are not the teacher's trained ones (models/wrn.py re-draws every conv
and batch norm after the deepcopy, and trainer/sokd.py `load_teacher` fills from the teacher
checkpoint only keys it has: a checkpoint of that repository's vanilla run carries its own
untrained `auxiliary_*` draw, any other none). 'teacher' starts the branch as a copy of the
loaded teacher's last stage and classifier, as wp502/SKD-RSL does (train_online.py: the
`auxiliary_forward` of zoo/SOKD.py deep-copies the teacher after `load_teacher_sokd`), the
variant FFKD's paper compared with (`Method.pretrained_heads`, at the start of a run).

Departures from the authors' code, and why:
- The teacher's backbone runs in inference mode (running statistics, untouched), as every frozen
  teacher here; the code leaves it in training mode (`self.teacher.train()`), so its features
  and logits there use batch statistics and its running statistics drift during the run.
  wp502/SKD-RSL runs it in eval mode (train_one_epoch.py `train_online_distill_sokd`).
- The learning-rate schedule is the run's (`config.optimizer`); configs/sokd.yaml decays at
  epochs 100 and 150 of 200 from 0.1.
- Teachers: any CIFAR ResNet or WRN (the code: WRNs only); other models raise naming
  `config.teacher.model`. A fresh branch's classifier has Flax's Dense initialisation, the
  zoo's (PyTorch's default Linear weight with a zero bias there).
- The code also picks the "best teacher" by the branch's test accuracy and saves it; here the
  student picks the best checkpoint and the branch's held-out accuracy is not evaluated (its
  agreement with the student and the teacher is, on the diagnostics subset).
wp502/SKD-RSL differs from the authors' code in the initialisation above, its teacher's eval
mode, and in the temperature of FFKD's comparison runs (run_sh/cifar100/run_cifar100_sokd-7.sh:
`--kd_T 3`); its weights are the same (1, from train_online.py's arguments).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax import models
from ffkd_jax.losses.classification import cross_entropy, top_k_correct
from ffkd_jax.losses.sokd import sokd_kl_terms
from ffkd_jax.methods.base import Method, Role
from ffkd_jax.methods.common import check_positive, check_temperatures, check_weights
from ffkd_jax.methods.common import prediction_agreement
from ffkd_jax.parallel import DATA_AXIS

BRANCH_INITS = ('random', 'teacher')
WEIGHTS = (
    'ce_weight',
    'kd_weight',
    'branch_ce_weight',
    'branch_kd_teacher_weight',
    'branch_kd_student_weight',
)


class AuxiliaryBranch(nn.Module):
  """The teacher's heads: its last stage, pool and classifier (`tail`) on the teacher's
  stage{K-1} map -> {'logits', 'embedding'}."""

  tail: nn.Module  # models.create_tail(teacher model)

  @nn.compact
  def __call__(self, features, *, train: bool) -> dict[str, Any]:
    logits, tail_features = self.tail(features[branch_input(self.tail)], train=train)
    return {'logits': logits, 'embedding': tail_features['embedding']}


def branch_input(tail: nn.Module) -> str:
  """The feature a tail reads: the output of the stage before its first."""
  return f'stage{tail.first_stage - 1}'


class SOKD(Method):
  name = 'sokd'

  @classmethod
  def check_config(cls, config):
    check_temperatures(config, 'sokd.temperature')
    check_weights(config, *(f'sokd.{w}' for w in WEIGHTS))
    check_positive(config, 'sokd.branch_lr_scale')
    if config.sokd.branch_init not in BRANCH_INITS:
      raise ValueError(
          f'config.sokd.branch_init={config.sokd.branch_init!r} is not valid; valid: '
          f'{BRANCH_INITS}.'
      )
    if config.teacher.model not in models.tail_models():
      raise ValueError(
          f'config.teacher.model={config.teacher.model!r}: sokd builds its auxiliary branch '
          "from the teacher's last stage and classifier, which only these models can run on "
          f"an inner map: {', '.join(models.tail_models())}."
      )

  @classmethod
  def make_roles(cls, config):
    return (
        Role(
            'teacher',
            config.teacher.model,
            train_backbone=False,
            pretrained=True,
            lr_scale=float(config.sokd.branch_lr_scale),
        ),
        Role('student', config.model),
    )

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.sokd
    self.teacher_model = config.teacher.model
    self.temperature = float(c.temperature)
    self.weights = {w: float(c[w]) for w in WEIGHTS}
    self.branch_init = c.branch_init
    self.branch_feature = branch_input(
        models.create_tail(self.teacher_model, 1, field='config.teacher.model')
    )

  def _tail(self) -> nn.Module:
    if self.num_classes is None:
      raise ValueError(
          "sokd's auxiliary branch needs the class count: create the method with "
          'methods.create_method(config, feature_shapes, num_classes) (states.resolve does).'
      )
    return models.create_tail(
        self.teacher_model, self.num_classes, axis_name=DATA_AXIS, field='config.teacher.model'
    )

  def required_features(self):
    return {'teacher': (self.branch_feature,)}

  def heads(self, role):
    return AuxiliaryBranch(self._tail()) if role == 'teacher' else None

  def pretrained_heads(self, role, heads, backbone):
    """'teacher' init: the branch's tail takes the loaded teacher's variables of the same names
    (its last stage and classifier: models.create_tail)."""
    if role != 'teacher' or self.branch_init != 'teacher':
      return heads
    copied = {}
    for collection in ('params', 'batch_stats'):
      tail = heads[collection].get('tail', {})
      missing = sorted(set(tail) - set(backbone[collection]))
      if missing:
        raise ValueError(
            f"sokd: the teacher's {collection} have no {missing} for the branch to copy."
        )
      copied[collection] = dict(heads[collection], tail={k: backbone[collection][k] for k in tail})
    return copied

  def loss(self, outputs, labels, step):
    del step
    teacher, student = outputs['teacher'], outputs['student']
    branch = teacher.heads['logits']
    terms = sokd_kl_terms(
        self.distillation_logits(teacher.logits),
        self.distillation_logits(student.logits),
        self.distillation_logits(branch),
        self.temperature,
    )
    w = self.weights
    ce = cross_entropy(student.logits, labels)
    branch_ce = cross_entropy(branch, labels)
    student_loss = w['ce_weight'] * ce + w['kd_weight'] * terms.kd_student
    branch_loss = (
        w['branch_ce_weight'] * branch_ce
        + w['branch_kd_teacher_weight'] * terms.kd_branch_teacher
        + w['branch_kd_student_weight'] * terms.kd_branch_student
    )
    metrics = {
        'loss/student_ce': ce,
        'loss/student_kd': terms.kd_student,
        'loss/branch_ce': branch_ce,
        'loss/branch_kd_teacher': terms.kd_branch_teacher,
        'loss/branch_kd_student': terms.kd_branch_student,
        'train/branch_top1': jnp.mean(top_k_correct(branch, labels, 1)),
    }
    return {'teacher': branch_loss, 'student': student_loss}, metrics

  def diagnostics(self, outputs):
    teacher, student = outputs['teacher'], outputs['student']
    branch = teacher.heads['logits']
    metrics = prediction_agreement(teacher.logits, student.logits)
    metrics.update(prediction_agreement(branch, student.logits, 'agreement/branch-student'))
    metrics.update(prediction_agreement(teacher.logits, branch, 'agreement/teacher-branch'))
    return metrics
