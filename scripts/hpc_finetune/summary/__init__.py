"""The run's manifest and training.env."""
