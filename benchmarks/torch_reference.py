"""PyTorch reference of one FFKD train step, for timing against the JAX step (no JAX here).

The networks are tests/torch_zoo.py's PyTorch definitions of the model zoo (RepDistiller's
modules, the ones `import_torch` is tested against), so any registered teacher and student work.

The step is FFKD as ffkd_jax/methods/ffkd.py computes it, in the shape of its authors' code
(wp502/SKD-RSL train_one_epoch.py::train_our_distill, zoo/Our_1.py; docs/FFKD.md), written here
for timing (not copied):
  forward phase (student + forward regressors; teacher eval, no_grad), batch 1:
    L_S = alpha CE + beta_fwd T^2 KL(p_T || p_S) + gamma_fwd sum_k CKA_k channel_kl(U_k, R_fwd(V_k))
  feedback phase (teacher + feedback regressors, teacher train; the updated student eval,
  no_grad), batch 2:
    L_T = alpha CE + beta_fdbk T^2 KL(p_S || p_T) + gamma_fdbk sum_{CKA_k <= mean} channel_kl(
          R_fb(V_k), U_k)
CKA_k: biased linear CKA of the flattened maps (centred Gram matrices, zoo/CKA.py), detached.
Regressors: ConvReg (3x3 stride-2 conv / 4x4 stride-2 transposed conv / valid conv, batch norm,
ReLU). Each phase: its own backward pass and SGD step (momentum, L2 weight decay; the teacher at
teacher_lr_scale times the rate). Presets without feedback skip the second phase; `fkd` has no
channel term.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tests import torch_zoo


def build_model(name: str, num_classes: int) -> nn.Module:
  """The PyTorch twin of ffkd_jax's `name`: forward (NCHW) returns (logits, features), features
  keyed as ffkd_jax's (`stage{i}`, `stage{i}_preact`, `embedding`)."""
  return torch_zoo.build(name, num_classes)


def count_parameters(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


class ConvReg(nn.Module):
  """(n, c_s, h_s, w_s) -> (n, c_t, h_t, w_t): the convolution the two heights call for, batch
  norm, ReLU (ffkd_jax.methods.connectors.Regressor)."""

  def __init__(self, student_chw, teacher_chw):
    super().__init__()
    c_s, h_s, w_s = student_chw
    c_t, h_t, w_t = teacher_chw
    if h_s == 2 * h_t:
      self.conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    elif 2 * h_s == h_t:
      self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    else:
      self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    self.bn = nn.BatchNorm2d(c_t)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


# ------------------------------------------------------------------------------------ losses


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  """Biased linear CKA of (n, ...) and (n, ...) flattened per example (centred Gram form)."""
  n = x.shape[0]
  x, y = x.reshape(n, -1), y.reshape(n, -1)
  x = x - x.mean(dim=0, keepdim=True)
  y = y - y.mean(dim=0, keepdim=True)
  k, l = x @ x.t(), y @ y.t()
  return (k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum())


def channel_kl(target: torch.Tensor, source: torch.Tensor, tau: float) -> torch.Tensor:
  """tau^2 / (n c) sum KL(q(target) || q(source)), q: softmax over each channel's positions."""
  n, c = target.shape[:2]
  log_t = F.log_softmax(target.reshape(n, c, -1) / tau, dim=-1)
  log_s = F.log_softmax(source.reshape(n, c, -1) / tau, dim=-1)
  return F.kl_div(log_s, log_t, reduction='sum', log_target=True) * tau**2 / (n * c)


def softened_kl(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
  """tau^2 mean_n KL(softmax(target / tau) || softmax(logits / tau))."""
  return tau**2 * F.kl_div(
      F.log_softmax(logits / tau, dim=-1),
      F.log_softmax(target_logits / tau, dim=-1),
      reduction='batchmean',
      log_target=True,
  )


@dataclasses.dataclass(frozen=True)
class Terms:
  """The preset's switches and config.ffkd's weights (ffkd_jax.methods.ffkd; the defaults are
  ffkd_jax/defaults.py's)."""

  channel_loss: bool = True
  forward_cka: bool = True
  feedback: bool = True
  feedback_cka: bool = True
  temperature: float = 4.0
  alpha: float = 1.0
  beta_fwd: float = 1.0
  gamma_fwd: float = 1.0
  beta_fdbk: float = 0.1
  gamma_fdbk: float = 1.0
  cka_x100: bool = True


class FFKDStep:
  """Teacher, student, both regressor sets and both optimizers; `step(images, labels, images2,
  labels2)` runs the forward phase on the first batch, then the feedback phase on the second.

  layer_pairs: (teacher feature, student feature) names, as the JAX method pairs them.
  """

  def __init__(
      self,
      teacher: str,
      student: str,
      num_classes: int,
      image_size: int,
      layer_pairs,
      terms: Terms,
      learning_rate: float = 0.05,
      momentum: float = 0.9,
      weight_decay: float = 5e-4,
      teacher_lr_scale: float = 0.05,
      device: str = 'cpu',
  ):
    self.terms = terms
    self.pairs = [tuple(p) for p in layer_pairs]
    self.teacher = build_model(teacher, num_classes)
    self.student = build_model(student, num_classes)
    with torch.no_grad():
      probe = torch.zeros(2, 3, image_size, image_size)
      _, t_feat = self.teacher.eval()(probe)
      _, s_feat = self.student.eval()(probe)

    def regressors():
      return nn.ModuleDict(
          {
              f'{t}-{s}': ConvReg(tuple(s_feat[s].shape[1:]), tuple(t_feat[t].shape[1:]))
              for t, s in self.pairs
          }
      )

    self.forward_regressors = regressors() if terms.channel_loss else nn.ModuleDict()
    self.feedback_regressors = (
        regressors() if terms.channel_loss and terms.feedback else nn.ModuleDict()
    )
    for module in (self.teacher, self.student, self.forward_regressors, self.feedback_regressors):
      module.to(device).train()
    self.teacher.requires_grad_(terms.feedback)
    sgd = dict(momentum=momentum, weight_decay=weight_decay)
    self.student_opt = torch.optim.SGD(
        list(self.student.parameters()) + list(self.forward_regressors.parameters()),
        lr=learning_rate,
        **sgd,
    )
    self.teacher_opt = (
        torch.optim.SGD(
            list(self.teacher.parameters()) + list(self.feedback_regressors.parameters()),
            lr=learning_rate * teacher_lr_scale,
            **sgd,
        )
        if terms.feedback
        else None
    )

  @property
  def regressors(self) -> nn.ModuleDict:  # the trainable extras, for parameter counts
    return nn.ModuleDict({'fwd': self.forward_regressors, 'fb': self.feedback_regressors})

  def _stage_terms(self, t_feat, s_feat, regressors, feedback: bool):
    t = self.terms
    scores, losses = [], []
    for t_name, s_name in self.pairs:
      u, v = t_feat[t_name], s_feat[s_name]
      score = linear_cka(u.detach(), v.detach())
      scores.append(score * 100.0 if t.cka_x100 else score)
      r = regressors[f'{t_name}-{s_name}'](v.detach() if feedback else v)
      losses.append(
          channel_kl(r, u, t.temperature) if feedback else channel_kl(u, r, t.temperature)
      )
    return torch.stack(scores), torch.stack(losses)

  def student_loss(self, images, labels):
    t = self.terms
    self.teacher.eval()
    with torch.no_grad():
      t_logits, t_feat = self.teacher(images)
    s_logits, s_feat = self.student(images)
    loss = t.alpha * F.cross_entropy(s_logits, labels) + t.beta_fwd * softened_kl(
        t_logits, s_logits, t.temperature
    )
    if t.channel_loss:
      scores, losses = self._stage_terms(t_feat, s_feat, self.forward_regressors, False)
      channel = (scores * losses).sum() if t.forward_cka else losses.sum()
      loss = loss + t.gamma_fwd * channel
    return loss

  def teacher_loss(self, images, labels):
    t = self.terms
    self.teacher.train()
    self.student.eval()
    with torch.no_grad():
      s_logits, s_feat = self.student(images)
    t_logits, t_feat = self.teacher(images)
    loss = t.alpha * F.cross_entropy(t_logits, labels) + t.beta_fdbk * softened_kl(
        s_logits, t_logits, t.temperature
    )
    if t.channel_loss:
      scores, losses = self._stage_terms(t_feat, s_feat, self.feedback_regressors, True)
      if t.feedback_cka:
        losses = losses * (scores <= scores.mean()).float()
      loss = loss + t.gamma_fdbk * losses.sum()
    self.student.train()
    return loss

  def step(self, images, labels, images2=None, labels2=None) -> dict[str, float]:
    self.student_opt.zero_grad(set_to_none=True)
    loss_student = self.student_loss(images, labels)
    loss_student.backward()
    self.student_opt.step()
    result = {'student': float(loss_student.detach())}
    if self.teacher_opt is not None:
      images2 = images if images2 is None else images2
      labels2 = labels if labels2 is None else labels2
      self.teacher_opt.zero_grad(set_to_none=True)
      loss_teacher = self.teacher_loss(images2, labels2)
      loss_teacher.backward()
      self.teacher_opt.step()
      result['teacher'] = float(loss_teacher.detach())
    return result
