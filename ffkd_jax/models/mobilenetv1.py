"""ImageNet MobileNetV1 (`mobilenetv1`), the student of the ImageNet KD benchmarks.

Mirrors mdistiller's `models/imagenet/mobilenetv1.py` (the usual ResNet50 -> MobileNetV1
pair): a 3x3 stride-2 conv + batch norm + ReLU, thirteen depthwise-separable units
(depthwise 3x3 + batch norm + ReLU, pointwise 1x1 + batch norm + ReLU), global average pool
and `fc` (there fixed at 1000 outputs; here `num_classes`). Names follow the PyTorch
`self.model` Sequential indices:

  model_0_0 (conv), model_0_1 (batch norm),
  model_{u}_0 (depthwise conv), model_{u}_1, model_{u}_3 (pointwise conv), model_{u}_4, u = 1..13,
  fc

Features for a 224x224 input, mdistiller's four feature maps (outputs of units 3, 5, 11, 13):

  stage1: (n, 56, 56, 128)
  stage2: (n, 28, 28, 256)
  stage3: (n, 14, 14, 512)
  stage4: (n, 7, 7, 1024)
  stage{i}_preact             the same before the unit's last ReLU
  embedding: (n, 1024)        global average of stage4, fed to `fc`
"""

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers

# (output channels, stride) of depthwise-separable units 1..13.
_UNITS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
_STAGE_AFTER_UNIT = {3: 1, 5: 2, 11: 3, 13: 4}


class MobileNetV1(nn.Module):
  num_classes: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    def bn(name):
      return layers.batch_norm(train, self.axis_name, self.dtype, name)

    x = layers.conv2d(32, 3, stride=2, dtype=self.dtype, name='model_0_0')(x)
    x = nn.relu(bn('model_0_1')(x))  # (n, 112, 112, 32)

    features = {}
    for unit, (out_channels, stride) in enumerate(_UNITS, start=1):
      in_channels = x.shape[-1]
      x = layers.conv2d(
          in_channels,
          3,
          stride=stride,
          groups=in_channels,
          dtype=self.dtype,
          name=f'model_{unit}_0',
      )(x)
      x = nn.relu(bn(f'model_{unit}_1')(x))
      x = layers.conv2d(out_channels, 1, dtype=self.dtype, name=f'model_{unit}_3')(x)
      preact = bn(f'model_{unit}_4')(x)
      x = nn.relu(preact)
      if unit in _STAGE_AFTER_UNIT:
        stage = _STAGE_AFTER_UNIT[unit]
        features[f'stage{stage}'] = x
        features[f'stage{stage}_preact'] = preact

    embedding = layers.global_avg_pool(x)  # (n, 1024)
    features['embedding'] = embedding
    logits = layers.dense(self.num_classes, self.dtype, 'fc')(embedding)
    return layers.classifier_logits(logits), features


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> MobileNetV1:
  del name
  return MobileNetV1(num_classes, axis_name=axis_name, dtype=dtype)
