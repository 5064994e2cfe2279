"""Datasets as the data stage reads them, their cleaning, and rows rendered as training sees them."""
