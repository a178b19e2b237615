"""Quickstart: the whole FFKD chain in minutes on a laptop CPU.

A short CE training of a small teacher, then FFKD into a smaller student, on CIFAR-10.
Offline, point it at an image folder (e.g. the CIFAR-10 JPEGs of ../shared/data, unpacked):

  python -m ffkd_jax.main --config configs/quickstart.py --workdir /tmp/quickstart \
      --config.dataset.name=image_folder --config.dataset.path=/tmp/ffkd-data/cifar10-jpeg

Any method runs the same way: --config.method=kd (or dist, rkd, fkd, ...).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'ffkd'
  config.dataset.name = 'cifar10'
  # CIFAR-10's statistics also when the images come from a folder.
  config.dataset.mean = (0.4914, 0.4822, 0.4465)
  config.dataset.std = (0.2470, 0.2435, 0.2616)
  config.model = 'resnet8'
  config.teacher.model = 'resnet14'
  config.teacher.pretrain_steps = 300
  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_train_steps = 300
  config.optimizer.schedule = 'cosine'
  config.optimizer.learning_rate = 0.1
  config.optimizer.warmup_epochs = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 100
  return config
