"""What a run leaves behind: the run dir, metrics, trackers, plots, model card, diagnostics, shared caches."""
