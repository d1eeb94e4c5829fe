"""Multi-label classification: every label an image holds (sigmoid outputs, thresholds chosen on validation)."""
