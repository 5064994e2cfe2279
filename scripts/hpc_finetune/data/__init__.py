"""Datasets as the data stage reads them (and fetched from buckets: remote), their cleaning, and rows rendered as
training sees them."""
