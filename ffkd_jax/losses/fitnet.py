"""FitNets: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015.

Hint loss: L_hint = mean((r(V_s) - U_t)^2) over all elements, where r is the regressor /
connector that maps the student's guided layer to the teacher's hint layer shape (the
caller's). This is RepDistiller's HintLoss (nn.MSELoss). Defaults found: weight 100 (RepDistiller
beta, mdistiller FITNET.LOSS.FEAT_WEIGHT), hint layer 2 (mdistiller), CE weight 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hint_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean squared error between the connector-mapped student map and the teacher map.

  No stop-gradient inside (the caller stops the teacher's gradient).

  Args:
    student: (n, h, w, c) connector output r(V_s).
    teacher: (n, h, w, c) teacher hint U_t.
  Returns:
    A scalar.
  """
  if student.shape != teacher.shape:
    raise ValueError(
        f"hint_loss needs the connector-mapped student map in the teacher's shape; got "
        f"student {student.shape} and teacher {teacher.shape}"
    )
  diff = student - teacher
  return jnp.mean(diff * diff)
