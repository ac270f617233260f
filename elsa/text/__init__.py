"""Text: sources, calibration blocks, evaluation windows, and the bundled corpora."""
