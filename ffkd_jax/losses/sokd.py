"""SOKD: Liu, Liu, Huang, "Semi-Online Knowledge Distillation", BMVC 2021, as its authors' code
computes it (swlzq/Semi-Online-KD, trainer/sokd.py `calculate_kd` with 'soft_target', and
kd_losses/st.py `SoftTarget`):

  KL_tau(a || b) = tau^2 mean_n KL(softmax(a_n / tau) || softmax(b_n / tau))
  kd_branch_teacher = KL_tau(sg(z_T) || z_A)     the branch A learns from the frozen teacher T
  kd_branch_student = KL_tau(sg(z_S) || z_A)     ... and from the student S
  kd_student        = KL_tau(sg(z_A) || z_S)     the student learns from the branch only

KL summed over classes, averaged over examples (`kl_div(..., reduction='batchmean') * T * T`).
Each target is stop-gradient (the code's `.detach()`), so the sum of the three gives the branch
the gradient of its two terms only and the student that of its one. The weights and the
cross-entropy terms are the method's (ffkd_jax/methods/sokd.py).
"""

from typing import NamedTuple

import jax

from ffkd_jax.losses.classification import softened_kl


class SOKDTerms(NamedTuple):
  kd_branch_teacher: jax.Array  # scalar: KL_tau(sg(z_T) || z_A)
  kd_branch_student: jax.Array  # scalar: KL_tau(sg(z_S) || z_A)
  kd_student: jax.Array  # scalar: KL_tau(sg(z_A) || z_S)


def sokd_kl_terms(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    branch_logits: jax.Array,
    temperature: float,
) -> SOKDTerms:
  """The three KL terms of SOKD, each with its target stop-gradient.

  Args:
    teacher_logits: (n, classes) logits z_T of the frozen teacher.
    student_logits: (n, classes) logits z_S of the student.
    branch_logits: (n, classes) logits z_A of the teacher's auxiliary branch.
    temperature: tau > 0 (the code's SoftTarget(T=4)).
  Returns:
    SOKDTerms of three scalars >= 0.
  """
  sg = jax.lax.stop_gradient
  return SOKDTerms(
      kd_branch_teacher=softened_kl(sg(teacher_logits), branch_logits, temperature),
      kd_branch_student=softened_kl(sg(student_logits), branch_logits, temperature),
      kd_student=softened_kl(sg(branch_logits), student_logits, temperature),
  )
