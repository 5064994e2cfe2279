"""Model directories: weight files, the model record, loading for merge and evaluation, portability, the demo model."""
