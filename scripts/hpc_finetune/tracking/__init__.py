"""Experiment tracking: the MLflow run of a fine-tuning run (train stage live, report stage after evaluate)."""
