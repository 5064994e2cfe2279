"""Object storage: the S3-protocol client."""
