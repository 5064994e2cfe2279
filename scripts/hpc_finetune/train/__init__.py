"""The train stage's library: data and loss, the trainer, checkpoints and signals, speed levers, 4-bit layers, the fingerprint, preflight."""
