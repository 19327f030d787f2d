"""Examples to run from a source checkout (``python -m examples...``)."""
