"""FitNets: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015.

  L_S = ce_weight CE(y, z_S) + hint_weight mean((r(V_S) - U_T)^2)

on one middle stage: the student's guided map V_S goes through the regressor r and regresses
the teacher's hint map U_T (sg) at the teacher's shape. r is RepDistiller's `ConvReg`
(HobbitLong/RepDistiller models/util.py, built in train_student.py as
`ConvReg(feat_s[hint_layer].shape, feat_t[hint_layer].shape)`, use_relu on):
`connectors.Regressor`, a 3x3 stride-2 conv, a 4x4 stride-2 transposed conv or a valid conv by
the two sizes, then batch norm and ReLU; a trainable head of the student. A per-example loss: a
local mean, nothing gathered. (Before 2026-12-01 r was a 1x1 conv + batch norm without the ReLU,
the teacher's map average-pooled where larger.)

Defaults (`config.fitnet`): hint_weight 100, CE weight 1, no logit KD (RepDistiller's
scripts/run_cifar_distill.sh `--distill hint -a 0 -b 100`; mdistiller FITNET.LOSS.FEAT_WEIGHT
100), trained in one stage as both train_student.py and mdistiller do. The hint layer
(`layer_pair='auto'`) is the middle one of the stage pairs aligned from the deepest end
(ffkd_jax/methods/common.py), index (K - 1) // 2: stage2 of the CIFAR ResNets and WRNs,
RepDistiller's `--hint_layer 2`, and on its vgg / mobilenetv2 pairs the same layer too.
The teacher is frozen and pre-trained.
"""

import jax

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.fitnet import hint_loss
from ffkd_jax.methods.common import TeacherStudent
from ffkd_jax.methods.connectors import RegressorHeads, check_regressible
from ffkd_jax.methods.pairs import middle_stage_pair, pair_key, resolve_pairs
from ffkd_jax.parallel import DATA_AXIS


class FitNet(TeacherStudent):
  name = 'fitnet'

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.fitnet
    self.ce_weight, self.hint_weight = c.ce_weight, c.hint_weight
    self.layer_pairs = resolve_pairs(
        c.layer_pair, 'fitnet.layer_pair', feature_shapes, middle_stage_pair, count=1
    )
    check_regressible(feature_shapes, self.layer_pairs, 'fitnet.layer_pair')

  @property
  def layer_pair(self) -> tuple[str, str]:
    return self.layer_pairs[0]

  def heads(self, role):
    if role != 'student':
      return None
    t_name, s_name = self.layer_pair
    target = tuple(self.feature_shapes['teacher'][t_name].shape[1:])  # (h_t, w_t, c_t)
    return RegressorHeads(((pair_key(self.layer_pair), s_name, target),), axis_name=DATA_AXIS)

  def _hint(self, outputs):
    t_name, _ = self.layer_pair
    student = outputs['student'].heads[pair_key(self.layer_pair)]  # (n, h_t, w_t, c_t)
    teacher = jax.lax.stop_gradient(outputs['teacher'].features[t_name])
    return hint_loss(student, teacher)

  def loss(self, outputs, labels, step):
    del step
    ce = cross_entropy(outputs['student'].logits, labels)
    hint = self._hint(outputs)
    return (
        {'student': self.ce_weight * ce + self.hint_weight * hint},
        {'loss/student_ce': ce, 'loss/student_hint': hint},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['hint/eval'] = jax.lax.pmean(self._hint(outputs), DATA_AXIS)
    return metrics
