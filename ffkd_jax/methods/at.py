"""AT: Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017.

  L_S = ce_weight CE(y, z_S) + at_weight sum_pairs mean((Q_S - Q_T)^2)

with Q the L2-normalised spatial attention mean_c |F|^p of a stage output
(ffkd_jax/losses/at.py). Per example, so a local mean: nothing is gathered. Where the two maps
of a pair differ in size, the larger is average-pooled to the smaller first, as RepDistiller's
Attention.at_loss does.

Defaults (`config.at`): every stage output, paired from the deepest end (`layer_pairs='auto'`,
ffkd_jax/methods/common.py; RepDistiller's `feat[1:-1]`), p = 2, at_weight 1000, CE weight 1,
no logit KD (RepDistiller's scripts/run_cifar_distill.sh `--distill attention -a 0 -b 1000`;
mdistiller AT.P 2, AT.LOSS.FEAT_WEIGHT 1000). The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.at import at_loss
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.common import TeacherStudent, check_poolable_pairs, pool_to_smaller
from ffkd_jax.methods.pairs import aligned_stage_pairs, resolve_pairs
from ffkd_jax.parallel import DATA_AXIS


class AT(TeacherStudent):
  name = 'at'

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.at
    self.ce_weight, self.at_weight, self.p = c.ce_weight, c.at_weight, c.p
    self.layer_pairs = resolve_pairs(
        c.layer_pairs, 'at.layer_pairs', feature_shapes, aligned_stage_pairs
    )
    check_poolable_pairs(feature_shapes, self.layer_pairs, 'at.layer_pairs')

  def _at(self, outputs):
    total = 0.0
    for t_name, s_name in self.layer_pairs:
      student = outputs['student'].features[s_name]  # (n, h, w, c_s)
      teacher = jax.lax.stop_gradient(outputs['teacher'].features[t_name])  # (n, h', w', c_t)
      student, teacher = pool_to_smaller(student, teacher)
      total += at_loss(student, teacher, self.p)
    return total

  def loss(self, outputs, labels, step):
    del step
    ce = cross_entropy(outputs['student'].logits, labels)
    at = self._at(outputs)
    return (
        {'student': self.ce_weight * ce + self.at_weight * at},
        {'loss/student_ce': ce, 'loss/student_at': at},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    # A per-example loss: the mean over devices of local means is the global-batch mean.
    metrics['at/eval'] = jax.lax.pmean(self._at(outputs), DATA_AXIS)
    return metrics
