"""The default configuration: every field with its default (defined in ffkd_jax/defaults.py).

Other configs import this module and override a few fields; any field can be changed from the
command line: `--config.batch_size=32 --config.ffkd.gamma_fdbk=0.5`.
"""

from ffkd_jax.defaults import get_config

__all__ = ['get_config']
