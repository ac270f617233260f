"""Records: MLflow tracking and its outbox, publishing, redaction, comparing runs, plots."""
