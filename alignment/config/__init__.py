"""The run's schema (a leaf), the stage registry, and the small facts composition needs (sources, search path)."""
