"""FFKD: forward and feedback knowledge distillation, as docs/FFKD.md reconstructs it.

The paper's full text is not public; this is the project's reconstruction (docs/FFKD.md).

Forward loss (student and its connectors):
  L_S = a_ce CE(y, z_S) + a_kd tau^2 KL(sg(p_T) || p_S)
      + a_feat sum_l mean_c w[l, c] mean((V[..., c] - sg(U[..., c]))^2)
Feedback loss (teacher):
  L_T = b_ce CE(y, z_T) + b_fb sum_l mean_c w[l, c] (1 - omega[l, c] with sg(V))
      + b_kd tau^2 KL(sg(p_S) || p_T)
with omega[l, c] = CKA(U[..., c], V[..., c]) over the global batch and
w[l, c] = C softmax_c((1 - sg(omega[l, c])) / tau_w) (or 1 with the weighting off).

Presets (the reported ablation's rows) switch terms off: `fkd` (a_feat = 0, no feedback),
`fkd_cka` (CKA channel weights, no feedback), `fkd_fbkd` (feedback, w = 1), `ffkd` (all).
"""

import dataclasses

import jax
import jax.numpy as jnp

from ffkd_jax import cka
from ffkd_jax.losses import ffkd as ffkd_losses
from ffkd_jax.losses.classification import cross_entropy, softened_kl
from ffkd_jax.methods.base import Method, Role, gather
from ffkd_jax.methods.common import check_at_least, check_temperatures
from ffkd_jax.methods.connectors import ConnectorHeads
from ffkd_jax.methods.pairs import pair_key, resolve_pairs, stage_names
from ffkd_jax.parallel import DATA_AXIS

PRESETS = ('ffkd', 'fkd', 'fkd_cka', 'fkd_fbkd')


@dataclasses.dataclass(frozen=True)
class FFKDTerms:
  """The weights and switches of one FFKD recipe, after the preset is applied."""

  temperature: float
  a_ce: float
  a_kd: float
  a_feat: float
  b_ce: float
  b_fb: float
  b_kd: float
  use_channel_weights: bool
  weight_temperature: float
  weight_scale: float
  unbiased_hsic: bool
  feedback_start_step: int
  teacher_lr_scale: float

  @property
  def feedback(self) -> bool:
    """With b_fb = b_kd = 0 the teacher stays frozen."""
    return self.b_fb > 0 or self.b_kd > 0


def terms_for_preset(preset: str, ffkd_config) -> FFKDTerms:
  """Applies a preset's switches to `config.ffkd`."""
  if preset not in PRESETS:
    raise ValueError(f"config.method='{preset}' is not an FFKD preset; valid: {PRESETS}.")
  fields = {f.name: ffkd_config[f.name] for f in dataclasses.fields(FFKDTerms)}
  if preset == 'fkd':
    fields.update(a_feat=0.0, b_fb=0.0, b_kd=0.0, use_channel_weights=False)
  elif preset == 'fkd_cka':
    fields.update(b_fb=0.0, b_kd=0.0, use_channel_weights=True)
  elif preset == 'fkd_fbkd':
    fields.update(use_channel_weights=False)
  return FFKDTerms(**fields)


def auto_layer_pairs(teacher_shapes, student_shapes, max_pairs: int = 3):
  """Pairs, for each spatial resolution both networks have, their deepest stage outputs at it.

  Keeps the `max_pairs` deepest such pairs; a student map must be at least the teacher's size.
  """

  def deepest_by_size(shapes):
    return {tuple(shapes[name].shape[1:3]): name for name in stage_names(shapes)}

  teacher, student = deepest_by_size(teacher_shapes), deepest_by_size(student_shapes)
  common = sorted(set(teacher) & set(student), key=lambda hw: -hw[0] * hw[1])
  pairs = tuple((teacher[hw], student[hw]) for hw in common)[-max_pairs:]
  if not pairs:
    raise ValueError(
        'config.ffkd.layer_pairs=auto: the teacher and the student have no feature '
        'map of the same spatial size; list the pairs explicitly.'
    )
  return pairs


class FFKD(Method):
  """FFKD and its ablation presets."""

  @classmethod
  def check_config(cls, config):
    terms_for_preset(config.method, config.ffkd)
    check_temperatures(config, 'ffkd.temperature', 'ffkd.weight_temperature')
    check_at_least(config, 'ffkd.feedback_start_step', 0)

  @classmethod
  def make_roles(cls, config):
    t = terms_for_preset(config.method, config.ffkd)
    teacher = Role(
        'teacher',
        config.teacher.model,
        train_backbone=t.feedback,
        pretrained=True,
        lr_scale=t.teacher_lr_scale,
        start_step=int(t.feedback_start_step) if t.feedback else 0,
    )
    return (teacher, Role('student', config.model))

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    self.name = config.method
    self.terms = terms_for_preset(config.method, config.ffkd)
    self.layer_pairs = resolve_pairs(
        config.ffkd.layer_pairs, 'ffkd.layer_pairs', feature_shapes, auto_layer_pairs
    )

  @property
  def uses_features(self) -> bool:
    return self.terms.a_feat > 0 or (self.terms.feedback and self.terms.b_fb > 0)

  def heads(self, role):
    if role != 'student' or not self.uses_features:
      return None
    pairs = tuple(
        (pair_key((t, s)), s, tuple(self.feature_shapes['teacher'][t].shape[1:]))
        for t, s in self.layer_pairs
    )
    return ConnectorHeads(pairs, axis_name=DATA_AXIS)

  def _channel_weights(self, omega: jax.Array) -> jax.Array:
    if not self.terms.use_channel_weights:
      return jnp.ones_like(omega)
    scale = self.terms.weight_scale if self.terms.weight_scale > 0 else omega.shape[-1]
    return ffkd_losses.channel_weights(omega, self.terms.weight_temperature, scale)

  def loss(self, outputs, labels, step):
    t, teacher, student = self.terms, outputs['teacher'], outputs['student']
    metrics = {}
    ce_student = cross_entropy(student.logits, labels)
    kd_student = softened_kl(jax.lax.stop_gradient(teacher.logits), student.logits, t.temperature)
    loss_student = t.a_ce * ce_student + t.a_kd * kd_student
    metrics.update({'loss/student_ce': ce_student, 'loss/student_kd': kd_student})

    feedback_terms = []
    if self.uses_features:
      feat_total, fb_total = 0.0, 0.0
      for t_name, s_name in self.layer_pairs:
        key = pair_key((t_name, s_name))
        u = teacher.features[t_name]  # (n_local, h, w, c); stop-gradient if the teacher is frozen
        v = student.heads[key]  # (n_local, h, w, c), the connector's output
        # One CKA per channel on the global batch; V is stopped so that its gradient reaches
        # the teacher only, and the forward loss reads it through sg() in the channel weights.
        omega = cka.channel_cka(
            gather(u), gather(jax.lax.stop_gradient(v)), unbiased=t.unbiased_hsic
        )  # (c,)
        weights = self._channel_weights(omega)  # (c,), no gradient
        feat_total += ffkd_losses.weighted_feature_loss(u, v, weights)
        fb_total += ffkd_losses.feedback_alignment_loss(omega, weights)
        metrics[f'omega/{key}'] = jnp.mean(omega)
        metrics[f'weights_std/{key}'] = jnp.std(weights)
      loss_student += t.a_feat * feat_total
      metrics['loss/student_feat'] = feat_total
      feedback_terms.append(t.b_fb * fb_total)
      metrics['loss/teacher_feedback'] = fb_total

    losses = {'student': loss_student}
    if t.feedback:
      ce_teacher = cross_entropy(teacher.logits, labels)
      kd_teacher = softened_kl(jax.lax.stop_gradient(student.logits), teacher.logits, t.temperature)
      losses['teacher'] = t.b_ce * ce_teacher + t.b_kd * kd_teacher + sum(feedback_terms)
      metrics.update({'loss/teacher_ce': ce_teacher, 'loss/teacher_kd': kd_teacher})
    return losses, metrics

  def diagnostics(self, outputs):
    """Layer understanding Omega[l] = CKA(U, V) per pair (V: the connector's output when there
    is one, else the student's raw map), and the spread of the channel weights.

    Also the channel understanding itself, `omega_channels/<pair>` (c,), wherever V has the
    teacher's channel count (always with a connector): an array, drawn as a histogram by
    ffkd_jax.cka_plots and kept out of metrics.jsonl.
    """
    metrics = {}
    for t_name, s_name in self.layer_pairs:
      key = pair_key((t_name, s_name))
      u = gather(outputs['teacher'].features[t_name])
      heads = outputs['student'].heads
      v = gather(heads[key] if key in heads else outputs['student'].features[s_name])
      metrics[f'cka/{key}'] = cka.layer_cka(u, v)
      if u.ndim == v.ndim == 4 and u.shape[-1] == v.shape[-1]:
        omega = cka.channel_cka(u, v, unbiased=self.terms.unbiased_hsic)  # (c,)
        metrics[f'omega_channels/{key}'] = omega
      if key in heads:
        weights = self._channel_weights(omega)
        metrics[f'weights_std/{key}'] = jnp.std(weights)
        metrics[f'weights_max/{key}'] = jnp.max(weights)
    return metrics
