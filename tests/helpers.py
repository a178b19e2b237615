"""Shared builders for tests: tiny configs, states and batches, without any input pipeline."""

import jax
import numpy as np

from configs import default
from ffkd_jax import optim, parallel
from ffkd_jax import states as states_lib
from ffkd_jax import step as step_lib

NUM_CLASSES = 10
IMAGE_SIZE = 16
# The train split the tests pretend to have: `random_batch`'s 'index' rows, CRD's memory.
TRAIN_EXAMPLES = 256
TRAIN_LABELS = (np.arange(TRAIN_EXAMPLES) % NUM_CLASSES).astype(np.int32)


def tiny_config(method='ffkd', model='resnet8', teacher='resnet8'):
  config = default.get_config()
  config.method = method
  config.model = model
  config.teacher.model = teacher
  config.optimizer.schedule = 'constant'
  config.optimizer.learning_rate = 0.05
  return config


def build(config, steps_per_epoch=10, total_steps=100):
  """(method, programs, initial state on the host)."""

  def make_optimizer(lr_scale):
    schedule = optim.learning_rate_schedule(
        config.optimizer, steps_per_epoch, total_steps, scale=lr_scale
    )
    return optim.make_optimizer(config.optimizer), schedule

  method, programs = states_lib.resolve(config, NUM_CLASSES, IMAGE_SIZE, make_optimizer)
  state = states_lib.init_state(programs, IMAGE_SIZE, config.seed, method, TRAIN_LABELS)
  return method, programs, state


def random_batch(seed, batch_size=16, streams=2):
  """A step's batch with `streams` train streams ('image', 'label', 'image:1', 'label:1', ...)
  and stream 0's distinct example indices 'index' into TRAIN_LABELS (labels then drawn
  independently); a method reads the streams its phases name (FFKD's feedback phase: stream 1)."""
  rng = np.random.default_rng(seed)
  index = np.random.default_rng((seed, 1)).permutation(TRAIN_EXAMPLES)[:batch_size]
  batch = {'index': index.astype(np.int32)}
  for k in range(streams):
    batch[step_lib.batch_key('image', k)] = rng.normal(
        size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)
    ).astype(np.float32)
    batch[step_lib.batch_key('label', k)] = rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype(
        np.int32
    )
  return batch


def mesh_of(num_devices):
  return parallel.make_mesh(jax.devices()[:num_devices])
