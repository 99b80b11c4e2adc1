"""flashstep training package."""
