"""SP: Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

  L_S = ce_weight CE(y, z_S) + sp_weight sum_pairs ||G_T - G_S||_F^2 / n^2

with G the row-normalised n x n similarity matrix of a layer's maps (ffkd_jax/losses/sp.py).
G relates the examples of the batch to each other, so it is taken on the global batch (maps
gathered over the data axis); CE is a local mean.

Defaults (`config.sp`): the last stage's map of each network (RepDistiller's `feat[-2]`;
`layer_pairs='auto'`), sp_weight 3000, CE weight 1 and no logit KD (RepDistiller's
scripts/run_cifar_distill.sh `--distill similarity -a 0 -b 3000`; mdistiller SP.LOSS.FEAT_WEIGHT
3000). The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.sp import sp_loss
from ffkd_jax.methods.base import gather
from ffkd_jax.methods.common import TeacherStudent
from ffkd_jax.methods.pairs import last_stage_pair, resolve_pairs


class SP(TeacherStudent):
  name = 'sp'

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.sp
    self.ce_weight, self.sp_weight = c.ce_weight, c.sp_weight
    self.layer_pairs = resolve_pairs(
        c.layer_pairs, 'sp.layer_pairs', feature_shapes, last_stage_pair
    )

  def _sp(self, outputs):
    total = 0.0
    for t_name, s_name in self.layer_pairs:
      student = gather(outputs['student'].features[s_name])  # (n_global, h, w, c_s)
      teacher = gather(jax.lax.stop_gradient(outputs['teacher'].features[t_name]))
      total += sp_loss(student, teacher)
    return total

  def loss(self, outputs, labels, step):
    del step
    ce = cross_entropy(outputs['student'].logits, labels)
    sp = self._sp(outputs)
    return (
        {'student': self.ce_weight * ce + self.sp_weight * sp},
        {'loss/student_ce': ce, 'loss/student_sp': sp},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['sp/eval'] = self._sp(outputs)
    return metrics
