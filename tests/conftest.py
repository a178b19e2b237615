"""Test set-up: 4 emulated CPU devices, set before JAX starts; cheap compiles."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
# config.conv_impl='auto' on the CPU (ffkd_jax/models/conv.py), as training sets it (a user's
# own choice of that XLA option is kept).
from ffkd_jax.models import conv  # noqa: E402

conv.prepare_backend('auto')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402  (after the environment above)

# Tests run tiny models for a few steps: compile time dominates, so skip XLA's heavy passes.
jax.config.update('jax_disable_most_optimizations', True)
