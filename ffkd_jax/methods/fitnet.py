"""FitNets: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015.

  L_S = ce_weight CE(y, z_S) + hint_weight mean((r(V_S) - U_T)^2)

on one middle stage: the student's guided map V_S goes through a connector r (ConnectorHeads:
average pooling to the common size, 1x1 conv and batch norm to the teacher's channels; a
trainable head of the student) and regresses the teacher's hint map U_T. Where the teacher's
map is the larger one, it is average-pooled to the student's size (RepDistiller's ConvReg would
up-sample the student instead). A per-example loss: a local mean, nothing gathered.

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
from ffkd_jax.methods.common import (
    TeacherStudent,
    aligned_stage_pairs,
    check_pairs,
    common_size,
    parse_pairs,
    pool_to,
    spatial_size,
)
from ffkd_jax.methods.connectors import ConnectorHeads
from ffkd_jax.parallel import DATA_AXIS


def pair_key(teacher_feature: str, student_feature: str) -> str:
  return f'{teacher_feature}-{student_feature}'


class FitNet(TeacherStudent):
  name = 'fitnet'

  def __init__(self, config):
    super().__init__(config)
    c = config.fitnet
    self.ce_weight, self.hint_weight = c.ce_weight, c.hint_weight
    self._pair_spec = c.layer_pair
    self.layer_pair = None
    if c.layer_pair != 'auto':
      pairs = parse_pairs(c.layer_pair, 'fitnet.layer_pair')
      if len(pairs) != 1:
        raise ValueError(
            f"config.fitnet.layer_pair='{c.layer_pair}' is not valid: give 'auto' "
            "or one teacher:student pair, e.g. 'stage2:stage2'."
        )
      self.layer_pair = pairs[0]
    self.hint_size = None  # (h, w) where the hint is compared, set in setup

  def setup(self, feature_shapes):
    teacher, student = feature_shapes['teacher'], feature_shapes['student']
    if self._pair_spec == 'auto':
      pairs = aligned_stage_pairs(teacher, student)
      self.layer_pair = pairs[(len(pairs) - 1) // 2]
    check_pairs(feature_shapes, (self.layer_pair,), 'fitnet.layer_pair')
    t_name, s_name = self.layer_pair
    self.hint_size = common_size(
        spatial_size(teacher[t_name]),
        spatial_size(student[s_name]),
        f'config.fitnet.layer_pair {t_name}:{s_name}',
    )

  def required_features(self):
    if self.layer_pair is None:
      return {}
    return {'teacher': (self.layer_pair[0],), 'student': (self.layer_pair[1],)}

  def heads(self, role, feature_shapes):
    if role != 'student':
      return None
    t_name, s_name = self.layer_pair
    channels = feature_shapes['teacher'][t_name].shape[-1]
    return ConnectorHeads(
        ((pair_key(t_name, s_name), s_name, (*self.hint_size, channels)),), axis_name=DATA_AXIS
    )

  def _hint(self, outputs):
    t_name, s_name = self.layer_pair
    student = outputs['student'].heads[pair_key(t_name, s_name)]  # (n, h, w, c_t)
    teacher = pool_to(jax.lax.stop_gradient(outputs['teacher'].features[t_name]), self.hint_size)
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
