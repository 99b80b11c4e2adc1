"""flashstep models package."""
