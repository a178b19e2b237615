"""CIFAR-10 from an image folder (e.g. ../shared/data unpacked), sized for a 2-core CPU.

The argument picks the run: `teacher` (CE training of resnet20, 30 epochs) or a method name
(`ffkd`, `kd`, ...: resnet20 -> resnet8, 30 epochs); point config.teacher.checkpoint at the
teacher's workdir.

  python -m ffkd_jax.main --config configs/cifar10_folder.py:teacher --workdir /tmp/t20 \
      --config.dataset.path=/tmp/ffkd-data/cifar10-jpeg
"""

from configs import default


def get_config(arg: str = 'teacher'):
  config = default.get_config()
  config.dataset.name = 'image_folder'
  config.dataset.path = '/tmp/ffkd-data/cifar10-jpeg'
  config.dataset.val_fraction = 0.1
  config.dataset.mean = (0.4914, 0.4822, 0.4465)
  config.dataset.std = (0.2470, 0.2435, 0.2616)
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 30.0
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_epochs = 1.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  if arg == 'teacher':
    config.method = 'ce'
    config.model = 'resnet20'
  else:
    config.method = arg
    config.model = 'resnet8'
    config.teacher.model = 'resnet20'
  return config
