"""Scoring the base and the fine-tuned model: answer loss, greedy answers, exact match and token F1."""
