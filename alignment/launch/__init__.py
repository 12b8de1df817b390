"""Starting the ranks (accelerate/torchrun, SLURM) and the distributed engines' settings."""
