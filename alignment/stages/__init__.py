"""One module per stage; each defines its typed config and registers a `Stage` (alignment/config/registry.py)."""
