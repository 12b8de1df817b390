"""--multirun sweeps: their dirs, members and summary."""
