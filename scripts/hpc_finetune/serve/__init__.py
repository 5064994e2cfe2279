"""vLLM, driven from our environment: its interpreter (or image) runs serve/engine.py as a subprocess (runner.py),
the serve_check stage and the evaluate stage's vLLM engine compare and use its answers (check.py)."""
