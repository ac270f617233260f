"""Models in and out: loading, checking files, exporting, the sparse format and its decoding, model cards."""
