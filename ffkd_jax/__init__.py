"""ffkd_jax: knowledge distillation in JAX/Flax, built around FFKD (a reconstruction)."""

__version__ = "0.1.0"
