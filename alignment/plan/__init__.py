"""The decisions a run makes from its config (batch split, processes, reference), the memory plan, the dry run."""
