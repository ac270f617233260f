"""One prune run on Ray: the job, its trainer and workers, capacity, storage, preflight, progress, summary."""
