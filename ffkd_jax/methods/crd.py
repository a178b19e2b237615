"""CRD: Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020; as
HobbitLong/RepDistiller (the authors' code) runs it: crd/criterion.py, crd/memory.py,
train_student.py and helper/loops.py::train_distill.

  L_S = ce_weight CE(y, z_S) + kd_weight tau_kd^2 KL(sg(p_T) || p_S) + crd_weight L(s_S)
  L_T = crd_weight L(s_T)                    (the teacher's embedding head: its backbone is frozen)

L(s) is ContrastLoss on the scores of an example's own index and K negatives against the other
side's momentum memory (ffkd_jax/losses/crd.py has every formula). The features are the two
networks' pooled embeddings (train_student.py: `f_s = feat_s[-1]`, `f_t = feat_t[-1]`, the
vector before the classifier), each through its `Embed` (linear to feat_dim, L2-normalised): the
student's embed is a head of the student, the teacher's a trainable head of the frozen teacher
(RepDistiller puts both in trainable_list, under the student's optimizer: here each role's
optimizer is the same SGD at the same schedule, lr_scale 1). L_S + L_T is the reference's
`gamma * loss_cls + alpha * loss_div + beta * loss_kd`, split by the parameters each term reaches.

State (`Method.init_state`, checkpointed and restored with the run): the two memories
(N x feat_dim, uniform in +-1/sqrt(feat_dim / 3) as ContrastMemory), the normalisation
constants Z (-1 until the first step sets them from its scores, then fixed) and the train split's
class table for the negatives. Each step reads the memories as the previous step left them, then
writes the rows of its global batch (gathered from every device: every device computes the same
new memory); the negatives are drawn for the global batch from (config.seed, step), so the run is
the same on 1 or 4 devices and after a resume. The input pipeline supplies each example's index
(`example_index`).

Defaults (`config.crd`), RepDistiller's CIFAR-100 run (scripts/run_cifar_distill.sh: `--distill
crd -a 0 -b 0.8`, with -r 1 the default): ce_weight 1, kd_weight 0 (the CRD+KD row uses 1),
crd_weight 0.8; train_student.py's defaults feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5,
mode 'exact', kd_T 4.

Departures, and why:
  - Negatives with replacement, and the scores computed densely where cheaper (see
    ffkd_jax/losses/crd.py).
  - Z is set from the global batch's mean score (every device's rows), the reference's from its
    one GPU's batch; the same with one device.
  - Embed's linear layer starts from Flax's LeCun-normal weights and zero bias, not PyTorch's
    Linear initialisation; it computes in float32 whatever config.dtype is.
  - mode 'relax' (positives drawn from the same class) is not implemented: the CIFAR runs use
    'exact'.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ffkd_jax.losses import crd as crd_lib
from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import Phase, gather, gather_replicated
from ffkd_jax.methods.common import (
    TeacherStudent,
    check_at_least,
    check_temperatures,
    check_weights,
)
from ffkd_jax.parallel import DATA_AXIS

# Key domains: fold_in(key(seed), _CRD_KEYS), then the memory's initialisation or the negatives.
_CRD_KEYS, _MEMORY_INIT, _NEGATIVES = 0x435244, 0, 1


class Embed(nn.Module):
  """crd/criterion.py's Embed: (n, ...) -> l2(linear(flatten)), (n, dim)."""

  dim: int

  @nn.compact
  def __call__(self, features, train: bool):
    del train
    x = features['embedding']
    x = nn.Dense(self.dim, name='linear')(x.reshape(x.shape[0], -1))
    return {'embed': crd_lib.l2_normalize(x)}


class CRD(TeacherStudent):
  name = 'crd'
  example_index = True

  @classmethod
  def check_config(cls, config):
    c = config.crd
    check_weights(config, 'crd.ce_weight', 'crd.kd_weight', 'crd.crd_weight')
    check_temperatures(config, 'crd.temperature', 'crd.nce_t')
    check_at_least(config, 'crd.feat_dim', 1)
    check_at_least(config, 'crd.nce_k', 1)
    if not isinstance(c.nce_m, (int, float)) or not 0 < c.nce_m < 1:
      raise ValueError(
          f'config.crd.nce_m={c.nce_m!r} is not valid: the memory momentum must be in (0, 1).'
      )
    if c.scores not in crd_lib.SCORE_IMPLS:
      raise ValueError(
          f'config.crd.scores={c.scores!r} is not valid: use one of {crd_lib.SCORE_IMPLS}.'
      )

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.crd
    self.ce_weight, self.kd_weight, self.crd_weight = c.ce_weight, c.kd_weight, c.crd_weight
    self.temperature, self.nce_t, self.nce_m = c.temperature, c.nce_t, c.nce_m
    self.feat_dim, self.nce_k, self.scores = int(c.feat_dim), int(c.nce_k), c.scores
    self.seed = int(config.seed)

  def _key(self):
    """CRD's own keys: (seed, a tag of CRD's), apart from the roles' initialisation keys."""
    return jax.random.fold_in(jax.random.key(self.seed), _CRD_KEYS)

  def negatives_key(self, step):
    """The key of step `step`'s negatives: the same on every device and after a resume."""
    return jax.random.fold_in(jax.random.fold_in(self._key(), _NEGATIVES), step)

  def required_features(self):
    return {'teacher': ('embedding',), 'student': ('embedding',)}

  def heads(self, role):
    del role  # both: the student's embed_s, the teacher's embed_t
    return Embed(self.feat_dim)

  def init_state(self, train_labels):
    if train_labels is None:
      raise ValueError(
          "crd keeps a memory of every train example: it needs the train split's labels, "
          'which this input does not give.'
      )
    labels = np.asarray(train_labels)
    if len(np.unique(labels)) < 2:
      raise ValueError(
          'crd draws its negatives from the other classes: the train split needs at least 2 '
          f'classes, it has {len(np.unique(labels))}.'
      )
    n = len(labels)
    bound = 1.0 / math.sqrt(self.feat_dim / 3.0)
    key_s, key_t = jax.random.split(jax.random.fold_in(self._key(), _MEMORY_INIT))
    uniform = lambda key: jax.random.uniform(
        key, (n, self.feat_dim), jnp.float32, minval=-bound, maxval=bound
    )
    # ContrastMemory's memory_v1 (student embeddings) and memory_v2 (teacher); z_student is its
    # Z_v1, the constant of the student-anchored scores (read against memory_teacher).
    return {
        'memory_student': uniform(key_s),
        'memory_teacher': uniform(key_t),
        'z_student': jnp.float32(-1.0),
        'z_teacher': jnp.float32(-1.0),
        'classes': crd_lib.class_table(labels),
    }

  def phases(self):
    return (Phase('main', ('teacher', 'student'), self._loss, stateful=True),)

  def _loss(self, outputs, labels, step, inputs):
    state, index = inputs.method_state, inputs.index
    if index is None:
      raise ValueError("crd needs batch['index'], each example's position in the train split.")
    teacher, student = outputs['teacher'], outputs['student']
    v_s, v_t = student.heads['embed'], teacher.heads['embed']  # (b, d), unit norm
    num_data = state['memory_student'].shape[0]
    b = labels.shape[0]

    # The global batch's negatives, from (seed, step): the same on every device; this device's
    # rows after the example's own index.
    key = self.negatives_key(step)
    negatives = crd_lib.sample_negatives(key, gather(labels), state['classes'], self.nce_k)
    mine = jax.lax.dynamic_slice_in_dim(negatives, jax.lax.axis_index(DATA_AXIS) * b, b, axis=0)
    sample_idx = jnp.concatenate([index[:, None].astype(jnp.int32), mine], axis=1)

    # The student's anchor against the teacher's memory, and the reverse (ContrastMemory).
    out_s = crd_lib.contrast_scores(
        state['memory_teacher'], v_s, sample_idx, self.nce_t, self.scores
    )
    out_t = crd_lib.contrast_scores(
        state['memory_student'], v_t, sample_idx, self.nce_t, self.scores
    )
    z_s = _set_once(state['z_student'], out_s, num_data)
    z_t = _set_once(state['z_teacher'], out_t, num_data)
    loss_s = crd_lib.contrast_loss(out_s / z_s, num_data)
    loss_t = crd_lib.contrast_loss(out_t / z_t, num_data)

    ce = cross_entropy(student.logits, labels)
    kd = self.logit_kd(teacher.logits, student.logits, self.temperature)
    losses = {
        'student': self.ce_weight * ce + self.kd_weight * kd + self.crd_weight * loss_s,
        'teacher': self.crd_weight * loss_t,
    }
    # The new memories: the same on every device (gather_replicated), for the next step.
    rows = gather_replicated(index.astype(jnp.int32))
    new_state = dict(
        state,
        memory_student=crd_lib.momentum_update(
            state['memory_student'], rows, gather_replicated(v_s), self.nce_m
        ),
        memory_teacher=crd_lib.momentum_update(
            state['memory_teacher'], rows, gather_replicated(v_t), self.nce_m
        ),
        z_student=z_s,
        z_teacher=z_t,
    )
    metrics = {
        'loss/student_ce': ce,
        'loss/student_kd': kd,
        'loss/student_crd': loss_s,
        'loss/teacher_crd': loss_t,
        'crd/z_student': z_s,
        'crd/z_teacher': z_t,
    }
    return losses, metrics, new_state


def _set_once(z, scores, num_data):
  """Z as stored, or, while it is unset (< 0), mean(scores) x N over the global batch."""
  first = jax.lax.pmean(crd_lib.normalization_constant(scores, num_data), DATA_AXIS)
  return jnp.where(z < 0, first, z)
