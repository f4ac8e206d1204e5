"""Run configs (installed as `ift_jax.configs`); `default.py` is the embedded default."""
