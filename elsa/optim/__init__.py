"""The optimiser and its states: ADMM, the per-matrix states and moments, projection, schedules, memory."""
