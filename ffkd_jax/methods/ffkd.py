"""FFKD: forward and feedback knowledge distillation, as its authors' code does it.

"Reciprocal Teacher-Student Learning via Forward and Feedback Knowledge Distillation" (Gou et
al., IEEE TMM 26, 2024). The paper is closed; its specification here is the code that is very
likely its authors': wp502/SKD-RSL, `zoo/Our_1.py` (`ConvReg`, `OurLoss`) driven by
`train_one_epoch.py::train_our_distill` (docs/FFKD.md says what is known and what is ours).

Stage pairs k: every stage output after the stem, teacher stage k with student stage k
(`feat[1:-1]` there; `aligned_stage_pairs`, cut to the shorter network). U_k, V_k: the teacher's
and the student's maps; CKA_k = linear CKA of U_k and V_k, each example flattened, both
stop-gradient, the student's before its regressor (OurLoss.forward), here on the global batch;
x100 with `cka_x100` (`is_100cka`). R_fwd, R_fb: two sets of regressors (`ConvReg`,
ffkd_jax/methods/connectors.py), student shape to teacher shape. L = `losses.ffkd.channel_kl`.

One train step runs two ordered phases (train_our_distill):
  forward  (student and R_fwd; the teacher in inference mode, stop-gradient), main batch:
    L_S = alpha CE(y, z_S) + beta_fwd T^2 KL(sg(p_T) || p_S)
          + gamma_fwd sum_k CKA_k channel_kl(U_k, R_fwd(V_k))      (sum_k without forward CKA)
  feedback (teacher and R_fb, from step `feedback_start_step` on; after the student's update,
    on the second train stream's batch (`feedback_batch='independent'`) or on the same batch
    ('same'); the just-updated student in inference mode, stop-gradient):
    L_T = alpha CE(y, z_T) + beta_fdbk T^2 KL(sg(p_S) || p_T)
          + gamma_fdbk sum_{k: CKA_k <= mean CKA} channel_kl(R_fb(sg(V_k)), U_k)  (all k without
          feedback CKA); CKA_k there from the teacher's train-mode maps, as in the code.
The teacher has its own SGD at `teacher_lr_scale` times the student's schedule at the global step
(the code's 5e-3 against 0.1: 0.05, utils_train_common.py), the student's momentum and weight
decay; R_fwd trains with the student, R_fb with the teacher (R_fb are the teacher's heads, fed by
the student's maps).

Presets (the paper's ablation rows): `fkd` CE + KD; `fkd_cka` + the CKA-weighted channel loss, no
feedback; `fkd_fbkd` the unweighted channel loss + feedback over all stages; `ffkd` both CKA
switches on.

Departures from the code, and why:
- The feedback batch is the second train stream's batch at this step (a deterministic stream
  with its own order and augmentation), where the code draws a random batch of the epoch's list
  with replacement (`random.randint`, not reproducible, and a different augmentation only by
  the data loader's); 'same' reuses the forward batch.
- CKA on the global batch (every device's rows), where the code takes each GPU's batch.
- Networks with different numbers of stages: the code zips `feat[1:-1]` of both from the
  shallow end (dropping the longer one's deepest stages; its four ConvRegs assume four); here
  the deepest min(K_T, K_S) stages are paired (`aligned_stage_pairs`, as RepDistiller's
  standard pairs align them). Equal stage counts (every CIFAR ResNet or WRN pair) are unaffected.
- alpha, beta, gamma, T and x100 are defined nowhere in that repository; the defaults come from
  the sweep in docs/FFKD.md.
"""

import dataclasses

import jax
import jax.numpy as jnp

from ffkd_jax import cka
from ffkd_jax.losses import ffkd as ffkd_losses
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import Method, Phase, Role, gather
from ffkd_jax.methods.common import check_at_least, check_positive, check_temperatures
from ffkd_jax.methods.common import check_weights
from ffkd_jax.methods.common import prediction_agreement
from ffkd_jax.methods.connectors import RegressorHeads, check_regressible
from ffkd_jax.methods.pairs import aligned_stage_pairs, pair_key, resolve_pairs
from ffkd_jax.parallel import DATA_AXIS

FEEDBACK_BATCHES = ('independent', 'same')


@dataclasses.dataclass(frozen=True)
class Switches:
  """Which terms a preset turns on (zoo/Our_1.py's `is_use_fwd_cka`, `is_use_fdbk_cka`)."""

  channel_loss: bool  # the student's channel term (gamma_fwd)
  forward_cka: bool  # weight it by CKA_k
  feedback: bool  # the teacher trains (the feedback phase)
  feedback_cka: bool  # feedback over the stages with CKA_k <= mean only


PRESET_SWITCHES = {
    'fkd': Switches(channel_loss=False, forward_cka=False, feedback=False, feedback_cka=False),
    'fkd_cka': Switches(channel_loss=True, forward_cka=True, feedback=False, feedback_cka=False),
    'fkd_fbkd': Switches(channel_loss=True, forward_cka=False, feedback=True, feedback_cka=False),
    'ffkd': Switches(channel_loss=True, forward_cka=True, feedback=True, feedback_cka=True),
}
PRESETS = tuple(PRESET_SWITCHES)


def switches_for(preset: str) -> Switches:
  if preset not in PRESET_SWITCHES:
    raise ValueError(f"config.method='{preset}' is not an FFKD preset; valid: {PRESETS}.")
  return PRESET_SWITCHES[preset]


def stage_cka(u: jax.Array, v: jax.Array, x100: bool, unbiased: bool) -> jax.Array:
  """CKA_k of zoo/Our_1.py: linear CKA of the two maps flattened per example, on the global
  batch, stop-gradient; times 100 with x100."""
  score = cka.layer_cka(
      gather(jax.lax.stop_gradient(u)), gather(jax.lax.stop_gradient(v)), unbiased=unbiased
  )
  return score * 100.0 if x100 else score


class FFKD(Method):
  """FFKD and its ablation presets ('ffkd', 'fkd', 'fkd_cka', 'fkd_fbkd')."""

  @classmethod
  def check_config(cls, config):
    switches_for(config.method)
    c = config.ffkd
    check_temperatures(config, 'ffkd.temperature')
    check_at_least(config, 'ffkd.feedback_start_step', 0)
    check_weights(
        config,
        *(f'ffkd.{f}' for f in ('alpha', 'beta_fwd', 'gamma_fwd', 'beta_fdbk', 'gamma_fdbk')),
    )
    check_positive(config, 'ffkd.teacher_lr_scale')
    if c.feedback_batch not in FEEDBACK_BATCHES:
      raise ValueError(
          f'config.ffkd.feedback_batch={c.feedback_batch!r} is not valid; valid: '
          f'{FEEDBACK_BATCHES}.'
      )

  @classmethod
  def make_roles(cls, config):
    feedback = switches_for(config.method).feedback
    teacher = Role(
        'teacher',
        config.teacher.model,
        train_backbone=feedback,
        pretrained=True,
        lr_scale=config.ffkd.teacher_lr_scale,
        start_step=int(config.ffkd.feedback_start_step) if feedback else 0,
    )
    return (teacher, Role('student', config.model))

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.ffkd
    self.name = config.method
    self.switches = switches_for(config.method)
    self.temperature = float(c.temperature)
    self.alpha, self.beta_fwd, self.gamma_fwd = (
        float(c.alpha),
        float(c.beta_fwd),
        float(c.gamma_fwd),
    )
    self.beta_fdbk, self.gamma_fdbk = float(c.beta_fdbk), float(c.gamma_fdbk)
    self.cka_x100, self.unbiased_hsic = bool(c.cka_x100), bool(c.unbiased_hsic)
    self.feedback_stream = 1 if c.feedback_batch == 'independent' else 0
    self.layer_pairs = resolve_pairs(
        c.layer_pairs, 'ffkd.layer_pairs', feature_shapes, aligned_stage_pairs
    )
    check_regressible(feature_shapes, self.layer_pairs, 'ffkd.layer_pairs')

  def _regressors(self) -> RegressorHeads:
    pairs = tuple(
        (pair_key((t, s)), s, tuple(self.feature_shapes['teacher'][t].shape[1:]))
        for t, s in self.layer_pairs
    )
    return RegressorHeads(pairs, axis_name=DATA_AXIS)

  def heads(self, role):
    if role == 'student' and self.switches.channel_loss:
      return self._regressors()  # R_fwd
    if role == 'teacher' and self.switches.feedback and self.switches.channel_loss:
      return self._regressors()  # R_fb, fed by the student's maps
    return None

  def head_input(self, role):
    return 'student'

  def phases(self):
    forward = Phase(
        'forward', ('student',), self.student_loss, reads=('teacher',), read_heads=False
    )
    if not self.switches.feedback:
      return (forward,)
    feedback = Phase(
        'feedback',
        ('teacher',),
        self.teacher_loss,
        reads=('student',),
        stream=self.feedback_stream,
        read_heads=False,
    )
    return (forward, feedback)

  def _stage_terms(self, outputs, regressed, direction: str):
    """(K,) CKA_k and (K,) channel losses of one phase; `regressed` the heads of the role
    trained in it."""
    teacher, student = outputs['teacher'], outputs['student']
    scores, losses = [], []
    for t_name, s_name in self.layer_pairs:
      u, v = teacher.features[t_name], student.features[s_name]
      scores.append(stage_cka(u, v, self.cka_x100, self.unbiased_hsic))
      r = regressed[pair_key((t_name, s_name))]
      if direction == 'forward':  # KL(q(U) || q(R_fwd(V))): the teacher is read, stop-gradient
        losses.append(ffkd_losses.channel_kl(jax.lax.stop_gradient(u), r, self.temperature))
      else:  # KL(q(R_fb(sg V)) || q(U)): R_fb's input is already stop-gradient
        losses.append(ffkd_losses.channel_kl(r, u, self.temperature))
    return jnp.stack(scores), jnp.stack(losses)

  def student_loss(self, outputs, labels, step):
    """The forward phase: the student's loss L_S (the teacher read in inference mode)."""
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(student.logits, labels)
    kd = self.logit_kd(teacher.logits, student.logits, self.temperature)
    loss = self.alpha * ce + self.beta_fwd * kd
    metrics = {'loss/student_ce': ce, 'loss/student_kd': kd}
    if self.switches.channel_loss:
      scores, losses = self._stage_terms(outputs, student.heads, 'forward')
      channel = ffkd_losses.forward_channel_loss(scores, losses, self.switches.forward_cka)
      loss += self.gamma_fwd * channel
      metrics['loss/student_channel'] = channel
      for k, pair in enumerate(self.layer_pairs):
        metrics[f'cka_fwd/{pair_key(pair)}'] = scores[k]
        metrics[f'channel_fwd/{pair_key(pair)}'] = losses[k]
    return {'student': loss}, metrics

  def teacher_loss(self, outputs, labels, step):
    """The feedback phase: the teacher's loss L_T (the updated student read, stop-gradient)."""
    del step
    teacher, student = outputs['teacher'], outputs['student']
    ce = cross_entropy(teacher.logits, labels)
    kd = self.logit_kd(student.logits, teacher.logits, self.temperature)
    loss = self.alpha * ce + self.beta_fdbk * kd
    metrics = {'loss/teacher_ce': ce, 'loss/teacher_kd': kd}
    if self.switches.channel_loss:
      scores, losses = self._stage_terms(outputs, teacher.heads, 'feedback')
      channel = ffkd_losses.feedback_channel_loss(scores, losses, self.switches.feedback_cka)
      loss += self.gamma_fdbk * channel
      metrics['loss/teacher_channel'] = channel
      selected = (
          ffkd_losses.feedback_selection(scores)
          if self.switches.feedback_cka
          else jnp.ones_like(scores)
      )
      for k, pair in enumerate(self.layer_pairs):
        metrics[f'cka_fdbk/{pair_key(pair)}'] = scores[k]
        metrics[f'fdbk_selected/{pair_key(pair)}'] = selected[k]
    return {'teacher': loss}, metrics

  def diagnostics(self, outputs):
    """On the diagnostics subset, both roles in inference mode: per pair, CKA_k of the raw stage
    maps (the forward weights), and where the student has its forward regressors, the channel
    understanding `omega_channels/<pair>` (c_t,): CKA per teacher channel between U_k and
    R_fwd(V_k) (an array, drawn as a histogram by ffkd_jax.cka_plots, kept out of
    metrics.jsonl); plus the teacher-student top-1 agreement."""
    metrics = prediction_agreement(outputs['teacher'].logits, outputs['student'].logits)
    regressed = outputs['student'].heads
    for t_name, s_name in self.layer_pairs:
      key = pair_key((t_name, s_name))
      u = gather(outputs['teacher'].features[t_name])
      metrics[f'cka/{key}'] = cka.layer_cka(
          u, gather(outputs['student'].features[s_name]), unbiased=self.unbiased_hsic
      )
      if key in regressed:
        metrics[f'omega_channels/{key}'] = cka.channel_cka(
            u, gather(regressed[key]), unbiased=self.unbiased_hsic
        )
    return metrics
