"""Training: the loop (resumable, best-δ keeping), task models, and whole runs."""
