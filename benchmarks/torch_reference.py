"""PyTorch reference of one FFKD train step, for timing against the JAX step (no JAX here).

The networks are tests/torch_zoo.py's PyTorch definitions of the model zoo (RepDistiller's
modules, the ones `import_torch` is tested against), so any registered teacher and student work.

The step is FFKD as ffkd_jax/methods/ffkd.py computes it (see docs/FFKD.md):
  L_S = a_ce CE(y, z_S) + a_kd tau^2 KL(sg(p_T) || p_S)
      + a_feat sum_l mean_c w[l, c] mean((V[:, c] - sg(U[:, c]))^2)
  L_T = b_ce CE(y, z_T) + b_fb sum_l mean_c w[l, c] (1 - omega[l, c] with sg(V))
      + b_kd tau^2 KL(sg(p_S) || p_T)
omega[l, c] = linear CKA of channel c's maps over the batch (ffkd_jax.cka.channel_cka: columns
centred twice, rescaled, n x n Gram form when n < h*w else the feature form, eps 1e-6),
w = C softmax((1 - sg(omega)) / tau_w); connectors are 1x1 conv + batch norm (average pooling
first where the student's map is larger). One backward pass of L_S + L_T, then SGD with momentum
and L2 weight decay for the student (with its connectors) and for the teacher (at
teacher_lr_scale times the rate) -- optax's add_decayed_weights + sgd(momentum) is the same
update as torch.optim.SGD(weight_decay=...). Without feedback (b_fb = b_kd = 0) the teacher runs
in eval mode under no_grad, as the JAX step freezes it.
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


class Connector(nn.Module):
  """(n, c_s, h_s, w_s) -> (n, c_t, h_t, w_t): average pool if larger, 1x1 conv, batch norm."""

  def __init__(
      self, student_channels: int, student_hw: tuple[int, int], teacher_chw: tuple[int, int, int]
  ):
    super().__init__()
    c_t, h_t, w_t = teacher_chw
    self.window = (student_hw[0] // h_t, student_hw[1] // w_t)
    self.conv = nn.Conv2d(student_channels, c_t, 1, bias=False)
    self.bn = nn.BatchNorm2d(c_t)

  def forward(self, x):
    if self.window != (1, 1):
      x = F.avg_pool2d(x, self.window, self.window)
    return self.bn(self.conv(x))


# ------------------------------------------------------------------------------------ losses


def _centre_and_rescale(x: torch.Tensor, eps: float) -> torch.Tensor:
  """x (c, n, p): per channel, columns centred twice, divided by sqrt(energy) as cka.py does."""
  xc = x - x.mean(dim=1, keepdim=True)
  xc = xc - xc.mean(dim=1, keepdim=True)
  energy = (xc * xc).sum(dim=(1, 2)) + eps * (x * x).sum(dim=(1, 2)) + 1e-20  # (c,)
  return xc * torch.rsqrt(energy)[:, None, None]


def channel_cka(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  """u, v (n, c, h, w) -> (c,) biased linear CKA per channel (ffkd_jax.cka.channel_cka)."""
  n, c = u.shape[:2]
  x = _centre_and_rescale(u.reshape(n, c, -1).transpose(0, 1), eps)  # (c, n, p)
  y = _centre_and_rescale(v.reshape(n, c, -1).transpose(0, 1), eps)  # (c, n, q)
  if n < max(x.shape[2], y.shape[2]):  # Gram form, (c, n, n)
    k = torch.bmm(x, x.transpose(1, 2))
    l = torch.bmm(y, y.transpose(1, 2))
    cross, self_k, self_l = (k * l).sum((1, 2)), (k * k).sum((1, 2)), (l * l).sum((1, 2))
  else:  # feature form
    yx = torch.bmm(y.transpose(1, 2), x)  # (c, q, p)
    xx = torch.bmm(x.transpose(1, 2), x)  # (c, p, p)
    yy = torch.bmm(y.transpose(1, 2), y)  # (c, q, q)
    cross, self_k, self_l = (yx * yx).sum((1, 2)), (xx * xx).sum((1, 2)), (yy * yy).sum((1, 2))
  return cross / torch.sqrt(self_k * self_l + eps**2)


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
  """ffkd_jax.methods.ffkd.FFKDTerms, the fields the step reads."""

  temperature: float = 4.0
  a_ce: float = 1.0
  a_kd: float = 1.0
  a_feat: float = 1.0
  b_ce: float = 1.0
  b_fb: float = 1.0
  b_kd: float = 0.5
  use_channel_weights: bool = True
  weight_temperature: float = 0.1

  @property
  def feedback(self) -> bool:
    return self.b_fb > 0 or self.b_kd > 0


class FFKDStep:
  """Teacher, student, connectors and both optimizers; `step(images, labels)` trains once.

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
      teacher_lr_scale: float = 0.1,
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
    self.connectors = nn.ModuleDict(
        {
            f'{t}-{s}': Connector(
                s_feat[s].shape[1], tuple(s_feat[s].shape[2:]), tuple(t_feat[t].shape[1:])
            )
            for t, s in self.pairs
        }
    )
    for module in (self.teacher, self.student, self.connectors):
      module.to(device)
    self.student.train()
    self.connectors.train()
    self.teacher.train(terms.feedback)
    self.teacher.requires_grad_(terms.feedback)
    student_params = list(self.student.parameters()) + list(self.connectors.parameters())
    self.student_opt = torch.optim.SGD(
        student_params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
    )
    self.teacher_opt = (
        torch.optim.SGD(
            self.teacher.parameters(),
            lr=learning_rate * teacher_lr_scale,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        if terms.feedback
        else None
    )

  def _channel_weights(self, omega: torch.Tensor) -> torch.Tensor:
    if not self.terms.use_channel_weights:
      return torch.ones_like(omega)
    return omega.shape[0] * torch.softmax(
        (1.0 - omega.detach()) / self.terms.weight_temperature, dim=0
    )

  def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    t = self.terms
    if t.feedback:
      t_logits, t_feat = self.teacher(images)
    else:
      with torch.no_grad():
        t_logits, t_feat = self.teacher(images)
    s_logits, s_feat = self.student(images)
    loss_student = t.a_ce * F.cross_entropy(s_logits, labels) + t.a_kd * softened_kl(
        t_logits.detach(), s_logits, t.temperature
    )
    feat_total = s_logits.new_zeros(())
    fb_total = s_logits.new_zeros(())
    if t.a_feat > 0 or (t.feedback and t.b_fb > 0):
      for t_name, s_name in self.pairs:
        u = t_feat[t_name]  # (n, c, h, w)
        v = self.connectors[f'{t_name}-{s_name}'](s_feat[s_name])  # (n, c, h, w)
        omega = channel_cka(u, v.detach())  # (c,)
        weights = self._channel_weights(omega)
        per_channel = ((v - u.detach()) ** 2).mean(dim=(0, 2, 3))  # (c,)
        feat_total = feat_total + (weights * per_channel).mean()
        fb_total = fb_total + (weights * (1.0 - omega)).mean()
      loss_student = loss_student + t.a_feat * feat_total
    result = {'student': loss_student}
    if t.feedback:
      result['teacher'] = (
          t.b_ce * F.cross_entropy(t_logits, labels)
          + t.b_fb * fb_total
          + t.b_kd * softened_kl(s_logits.detach(), t_logits, t.temperature)
      )
    return result

  def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    self.student_opt.zero_grad(set_to_none=True)
    if self.teacher_opt is not None:
      self.teacher_opt.zero_grad(set_to_none=True)
    losses = self.losses(images, labels)
    sum(losses.values()).backward()  # one backward pass of L_S + L_T
    self.student_opt.step()
    if self.teacher_opt is not None:
      self.teacher_opt.step()
    return {k: float(v.detach()) for k, v in losses.items()}
