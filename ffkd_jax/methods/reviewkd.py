"""ReviewKD: Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021; as
megvii-research/mdistiller runs it (read at commit a08d46f): mdistiller/distillers/ReviewKD.py
(`hcl_loss` l. 11, `ReviewKD.__init__` l. 32, `forward_train` l. 66, `ABF` l. 106), defaults in
mdistiller/engine/cfg.py (CFG.REVIEWKD, l. 150-159) and configs/cifar100/reviewkd.yaml
(resnet32x4 -> resnet8x4, mdistiller's one ReviewKD config).

  L_S = ce_weight CE(y, z_S)
      + reviewkd_weight w(step) HCL([F_1 .. F_K, F_emb], sg[T_1 .. T_K, T_emb])

(ReviewKD.py l. 93-98.) HCL the hierarchical context loss (ffkd_jax/losses/reviewkd.py, the
code's `hcl_loss`), w the warm-up ramp. The levels, shallow to deep: the paired stages, then the
pooled embedding as a 1x1 map (`pooled_feat.unsqueeze(-1).unsqueeze(-1)`).

Targets T_k (ReviewKD.py l. 89-91): the teacher's pre-activation stage maps `preact_feats[1:]`,
`stage{i}_preact` here (mdistiller/models/cifar/resnet.py l. 203: `preact_feats = [f0, f1_pre,
f2_pre, f3_pre]`, f0 the stem's post-ReLU map, dropped by the [1:]), then its pooled embedding;
stop-gradient (the teacher runs under torch.no_grad, l. 68).

Student inputs (l. 72-79): its post-activation stage maps `feats` (CFG.REVIEWKD.STU_PREACT =
False, cfg.py l. 159; `student_preact` here reads `stage{i}_preact` instead), then its pooled
embedding. The code reverses that list to [pooled, f3, f2, f1, f0] (l. 80) and zips it with its
4 ABFs (l. 84), so for the CIFAR ResNets the stem f0 falls off the end: the levels are the
stages after the stem plus the embedding, on both sides. Here the stages are
`aligned_stage_pairs` (every stage after the stem; where the two networks have different numbers
of stages, the last min(K_t, K_s) of each, deepest aligned), or `layer_pairs` ('teacher:student'
stage names, shallow to deep).

F_k, the student's fused maps: `ReviewKDHeads`, the chain of the code's `ABF`s (l. 106-144), a
trainable head of the student (`get_learnable_parameters`, l. 57, adds the ABFs to the student's
optimizer). Per level, deepest first (`self.abfs = abfs[::-1]`, l. 55):
  x = BN(conv1x1(V_k))                   to mid channels, no bias;
  with a deeper level: y = nearest(r_{k+1}, h_k x w_k), the deeper level's residual resized to
      this student map's size (`SHAPES`); a = sigmoid(conv1x1([x, y])) (2 channels, with bias);
      x = a_0 x + a_1 y;
  r_k = nearest(x, the teacher's h x w)   (`OUT_SHAPES`; unchanged where the sizes agree);
  F_k = BN(conv3x3(r_k))                  to the teacher's channels, padding 1, no bias.
The deepest level (the embedding) has no deeper one, so no attention (`fuse` is idx < len - 1).
mid = min(512, the student's embedding width) (`mid_channel = min(512, in_channels[-1])`, l. 45;
the code stores CFG.REVIEWKD.MAX_MID_CHANNEL, l. 42, but uses the literal 512; here the cap is
`max_mid_channels`, 512). `nearest` is PyTorch's F.interpolate(mode='nearest'): output index i
reads input index min(floor(i in / out), in - 1).

Shapes: the code takes SHAPES (each level's student size), OUT_SHAPES (the teacher's),
IN_CHANNELS and OUT_CHANNELS from the config, set by hand per pair (cfg.py l. 154-157: [1, 8,
16, 32] twice and [64, 128, 256, 256] twice, the resnet8x4 / resnet32x4 values, deepest first for
the sizes, shallow first for the channels); here all four come from the roles' feature shapes
(tests/test_reviewkd.py checks that they give cfg.py's lists on that pair).

Defaults (`config.reviewkd`):
  - ce_weight 1.0: CFG.REVIEWKD.CE_WEIGHT (cfg.py l. 151);
  - reviewkd_weight 5.0: configs/cifar100/reviewkd.yaml l. 10 (REVIEWKD_WEIGHT: 5.0), which
    overrides cfg.py l. 152's 1.0. The original code (dvlab-research/ReviewKD,
    CIFAR-100/script/reviewKD.sh) uses 5.0 for resnet32x4 -> resnet8x4, the WRN pairs and
    ShuffleNetV1, 8.0 for resnet32x4 -> ShuffleNetV2, 0.6 for resnet56 -> resnet20 and 1.0 for
    resnet110 -> resnet32 (here `--config.reviewkd.reviewkd_weight` for such a pair);
  - warmup_steps 15640: CFG.REVIEWKD.WARMUP_EPOCHS 20 (cfg.py l. 153) at 782 steps an epoch
    (CIFAR-100 at batch 64), as config.dkd.warmup_steps;
  - student_preact False: CFG.REVIEWKD.STU_PREACT (cfg.py l. 159);
  - max_mid_channels 512: ReviewKD.py l. 45;
  - layer_pairs 'auto': the stages after the stem, as above.

Departures from the code, and why:
  - Warm-up: the code scales HCL by min(epoch / WARMUP_EPOCHS, 1) (l. 96) with mdistiller's
    1-based epoch (mdistiller/engine/trainer.py l. 78, `epoch = 1`), a staircase of 20 steps; a
    method here knows the global step only, so w(step) = min((step + 1) / warmup_steps, 1), as
    DKD's ramp (ffkd_jax/methods/dkd.py): both reach 1 in the 20th epoch, the per-step ramp
    below the staircase by less than 1/20. (dvlab-research/ReviewKD CIFAR-100/train.py uses the
    0-based epoch, `min(1, epoch/args.kd_warm_up)`, so its first epoch has no HCL at all.)
    warmup_steps = 1: no ramp.
  - Initialisation: the code draws conv1's and conv2's kernels with kaiming_uniform_(a=1)
    (l. 126-127), i.e. U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), which is LeCun uniform: here
    `variance_scaling(1, 'fan_in', 'uniform')`, the same distribution. The attention conv keeps
    PyTorch's Conv2d default, kaiming_uniform_(a=sqrt(5)) (bound 1 / sqrt(fan_in)) and a bias
    from U(-1/sqrt(fan_in), 1/sqrt(fan_in)): here the same two distributions (not the same
    draws). Batch norm starts at scale 1, bias 0 as PyTorch's; its running variance is the
    biased one (PyTorch keeps the unbiased); momentum 0.9 / epsilon 1e-5 (PyTorch's 0.1 / 1e-5),
    statistics over the global batch (`axis_name`), as the other heads here; the code's are per
    GPU (BatchNorm2d).
  - Pairs: the code pairs its ABF outputs (shallow first) with the teacher's levels by `zip`
    (l. 13), which only lines up when the two lists are the same length (its SHAPES are set by
    hand per pair); here they are paired deepest aligned, or by `layer_pairs`.
  - The code resizes to square maps (`(shape, shape)`, `(out_shape, out_shape)`, one side length
    a level, l. 135 and 142); here the same on the square maps of the zoo, and a non-square map is
    refused with a ValueError naming `reviewkd.layer_pairs` rather than resized to a square.
    Pairs out of depth order (a shallower stage after a deeper one) are refused too.
HCL is a mean over each level's elements (a per-example mean), so a local batch mean: nothing is
gathered; the heads' batch norm reduces over the global batch. The teacher is frozen and
pre-trained.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.losses.reviewkd import hcl_loss
from ffkd_jax.methods.common import TeacherStudent, check_at_least, check_weights, linear_warmup
from ffkd_jax.methods.pairs import aligned_stage_pairs, check_names, pair_key, resolve_pairs
from ffkd_jax.models.layers import batch_norm
from ffkd_jax.parallel import DATA_AXIS

EMBEDDING = 'embedding'
# The key of the deepest level (the two pooled embeddings) among the heads' outputs.
EMBEDDING_KEY = pair_key((EMBEDDING, EMBEDDING))


def nearest_indices(size: int, out: int) -> np.ndarray:
  """The input index each of `out` outputs reads under PyTorch's F.interpolate(mode='nearest'):
  min(floor(i * size / out), size - 1), the scale computed in float32 as PyTorch does."""
  scale = np.float32(size) / np.float32(out)
  return np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale), size - 1).astype(np.int32)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(n, h, w, c) -> (n, size[0], size[1], c), PyTorch's nearest interpolation."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  x = jnp.take(x, nearest_indices(h, size[0]), axis=1)
  return jnp.take(x, nearest_indices(w, size[1]), axis=2)


def _torch_conv_bias_init(fan_in: int):
  """PyTorch's Conv2d default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# kaiming_uniform_(a=1): gain sqrt(2 / (1 + a^2)) = 1, bound sqrt(3 / fan_in): LeCun uniform.
_KAIMING_UNIFORM_A1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
# PyTorch's Conv2d default, kaiming_uniform_(a=sqrt(5)): bound 1 / sqrt(fan_in).
_TORCH_CONV_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class ABF(nn.Module):
  """One level of the chain: mdistiller's `ABF` (attention-based fusion), NHWC.

  __call__(x, residual, out_size, train) -> (output, residual of this level):
  x (n, h, w, c_in) the student's map; residual (n, h', w', mid) the deeper level's, or None at
  the deepest level (`fuse` False); out_size the teacher's (h_t, w_t). The output is
  (n, h_t, w_t, out_channels), the residual (n, h_t, w_t, mid).
  """

  mid_channels: int
  out_channels: int
  fuse: bool
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, residual, out_size: tuple[int, int], train: bool):
    h, w = x.shape[1:3]
    x = nn.Conv(
        self.mid_channels, (1, 1), use_bias=False, kernel_init=_KAIMING_UNIFORM_A1, name='conv1'
    )(x)
    x = batch_norm(train, self.axis_name, name='bn1')(x)
    if self.fuse:
      y = nearest_resize(residual, (h, w))
      z = jnp.concatenate([x, y], axis=-1)  # (n, h, w, 2 mid)
      z = nn.Conv(
          2,
          (1, 1),
          kernel_init=_TORCH_CONV_DEFAULT,
          bias_init=_torch_conv_bias_init(2 * self.mid_channels),
          name='att_conv',
      )(z)
      z = nn.sigmoid(z)  # (n, h, w, 2)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    x = nearest_resize(x, out_size)
    out = nn.Conv(
        self.out_channels,
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        kernel_init=_KAIMING_UNIFORM_A1,
        name='conv2',
    )(x)
    return batch_norm(train, self.axis_name, name='bn2')(out), x


class ReviewKDHeads(nn.Module):
  """The ABF chain; returns {'<level key>': the fused map at the teacher's shape}.

  levels: (key, student feature, teacher shape (h_t, w_t, c_t)) shallow to deep, the last the
  embedding (a vector, fed as a 1x1 map); processed deepest first, each level fused with the
  residual of the one below it.
  """

  levels: Sequence[tuple[str, str, tuple[int, int, int]]]
  mid_channels: int
  axis_name: str | None = None

  @nn.compact
  def __call__(self, features, train: bool) -> dict[str, jax.Array]:
    outputs, residual = {}, None
    for depth, (key, source, (h_t, w_t, c_t)) in enumerate(reversed(self.levels)):
      x = features[source]
      if x.ndim == 2:  # the pooled embedding, (n, d) -> (n, 1, 1, d)
        x = x[:, None, None, :]
      abf = ABF(self.mid_channels, c_t, depth > 0, self.axis_name, name=f'abf_{key}')
      outputs[key], residual = abf(x, residual, (h_t, w_t), train)
    return outputs


def stage_depth(name: str) -> int | None:
  """'stem' -> 0, 'stage{i}' -> i; None for any other feature name."""
  if name == 'stem':
    return 0
  if name.startswith('stage') and name[len('stage') :].isdigit():
    return int(name[len('stage') :])
  return None


class ReviewKD(TeacherStudent):
  name = 'reviewkd'

  @classmethod
  def check_config(cls, config):
    check_weights(config, 'reviewkd.ce_weight', 'reviewkd.reviewkd_weight')
    check_at_least(
        config, 'reviewkd.warmup_steps', 1, 'the ReviewKD ramp lasts this many steps (1: none); '
    )
    check_at_least(config, 'reviewkd.max_mid_channels', 1, 'the ABFs width cap; ')
    if not isinstance(config.reviewkd.student_preact, bool):
      raise ValueError(
          f'config.reviewkd.student_preact={config.reviewkd.student_preact!r} is not valid: '
          'give True or False.'
      )

  def __init__(self, config, feature_shapes):
    super().__init__(config, feature_shapes)
    c = config.reviewkd
    self.ce_weight, self.reviewkd_weight = c.ce_weight, c.reviewkd_weight
    self.warmup_steps = int(c.warmup_steps)
    self.student_preact = bool(c.student_preact)
    field = 'reviewkd.layer_pairs'
    self.layer_pairs = resolve_pairs(c.layer_pairs, field, feature_shapes, aligned_stage_pairs)
    teacher, student = feature_shapes['teacher'], feature_shapes['student']
    for side, index in (('teacher', 0), ('student', 1)):
      depths = [stage_depth(pair[index]) for pair in self.layer_pairs]
      if None in depths or any(a >= b for a, b in zip(depths, depths[1:])):
        raise ValueError(
            f"config.{field}='{c.layer_pairs}' is not valid: the {side}'s features must be "
            "stages ('stem', 'stage1', ...) from shallow to deep, each deeper than the one "
            'before (the ABF chain fuses each level with the next deeper one).'
        )
    # (key, student feature, teacher feature, teacher shape) per level, shallow to deep.
    levels = []
    for t_name, s_name in self.layer_pairs:
      source = f'{s_name}_preact' if self.student_preact else s_name
      target = f'{t_name}_preact'
      for role, shapes, name in (('teacher', teacher, target), ('student', student, source)):
        check_names(shapes, role, [name], f'{field} {t_name}:{s_name}')
        h, w = shapes[name].shape[1:3]
        if h != w:
          raise ValueError(
              f'config.{field} {t_name}:{s_name}: the {role} map {name} is {h}x{w}; ReviewKD '
              "fuses and resizes square maps only (mdistiller's ABF resizes to one side length "
              'a level); pick other layer pairs.'
          )
      target_shape = tuple(teacher[target].shape[1:4])  # (h_t, w_t, c_t)
      levels.append((pair_key((t_name, s_name)), source, target, target_shape))
    for role, shapes in (('teacher', teacher), ('student', student)):
      check_names(shapes, role, [EMBEDDING], "method='reviewkd' (its deepest level)")
    levels.append((EMBEDDING_KEY, EMBEDDING, EMBEDDING, (1, 1, teacher[EMBEDDING].shape[-1])))
    self.levels = tuple(levels)
    # mdistiller: mid_channel = min(512, in_channels[-1]), the student's embedding width.
    self.mid_channels = min(int(c.max_mid_channels), int(student[EMBEDDING].shape[-1]))

  def required_features(self):
    return {
        'teacher': tuple(target for _, _, target, _ in self.levels),
        'student': tuple(source for _, source, _, _ in self.levels),
    }

  def heads(self, role):
    if role != 'student':
      return None
    return ReviewKDHeads(
        tuple((key, source, shape) for key, source, _, shape in self.levels),
        self.mid_channels,
        DATA_AXIS,
    )

  def warmup(self, step: jax.Array) -> jax.Array:
    """min((step + 1) / warmup_steps, 1): the weight of HCL at global step `step`."""
    return linear_warmup(step, self.warmup_steps)

  def _hcl(self, outputs):
    fused = outputs['student'].heads
    teacher = outputs['teacher'].features
    students, targets = [], []
    for key, _, target, shape in self.levels:
      students.append(fused[key])  # (n, h_t, w_t, c_t)
      targets.append(jax.lax.stop_gradient(teacher[target]).reshape((-1,) + shape))
    return hcl_loss(students, targets)

  def loss(self, outputs, labels, step):
    ce = cross_entropy(outputs['student'].logits, labels)
    hcl = self._hcl(outputs)
    warmup = self.warmup(step)
    total = self.ce_weight * ce + self.reviewkd_weight * warmup * hcl
    return (
        {'student': total},
        {'loss/student_ce': ce, 'loss/student_hcl': hcl, 'reviewkd/warmup': warmup},
    )

  def diagnostics(self, outputs):
    metrics = super().diagnostics(outputs)
    metrics['reviewkd/eval'] = jax.lax.pmean(self._hcl(outputs), DATA_AXIS)
    return metrics
