"""The container image: SIF checks and the image sources."""
