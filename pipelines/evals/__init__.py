"""Downstream evaluation: perplexity tasks, zero-shot lm-eval tasks, decode speed, re-evaluation."""
