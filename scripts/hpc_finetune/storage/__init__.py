"""Object storage: S3-protocol stores through boto3."""
