"""CIFAR-100 teacher training, the standard protocol of the CIFAR KD benchmarks.

240 epochs, batch 64, SGD momentum 0.9, weight decay 5e-4, lr 0.05 (0.01 for MobileNetV2 and the
ShuffleNets) decayed x0.1 at epochs 150, 180 and 210. The model is the argument:

  python -m ffkd_jax.main --config configs/cifar100_teacher.py:resnet32x4 --workdir DIR
"""

from configs import default

SMALL_LR_MODELS = ('mobilenetv2', 'shufflenetv1', 'shufflenetv2')


def cifar100_protocol(config, model: str):
  """The standard CIFAR-100 schedule, in place."""
  config.dataset.name = 'cifar100'
  config.dataset.augment = 'cifar'
  config.batch_size = 64
  config.num_epochs = 240.0
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'steps'
  config.optimizer.decay_epochs = (150, 180, 210)
  config.optimizer.decay_factor = 0.1
  config.optimizer.learning_rate = 0.01 if model in SMALL_LR_MODELS else 0.05
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config


def get_config(model: str = 'resnet32x4'):
  config = default.get_config()
  config.method = 'ce'
  config.model = model
  return cifar100_protocol(config, model)
