"""flashstep bench package."""
