"""Merging the adapter into full weights (in memory or streaming) and proving the merge by its logits."""
