"""Hydra launcher plugins of alignment-recipes (Hydra finds them in the `hydra_plugins` namespace package)."""
