"""Command line, logging, files and measurements every stage program shares; the config schema's defaults."""
