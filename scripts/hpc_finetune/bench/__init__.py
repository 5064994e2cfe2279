"""The benchmarks behind scripts/tools/bench.py: train vs a plain TRL baseline, streaming merge vs peft, workflow overhead."""
