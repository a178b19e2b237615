"""ffkd_jax: knowledge distillation in JAX/Flax, built around FFKD (a reconstruction)."""

from ffkd_jax.cka import channel_cka, hsic, layer_cka, linear_cka

__version__ = '0.1.0'

__all__ = ['channel_cka', 'hsic', 'layer_cka', 'linear_cka', '__version__']
