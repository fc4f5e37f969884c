"""Training: the loop, the objective, optimizer and schedule, precision, a run's checkpoints. `mtlm/run.py`
starts a run (train.py's entry point)."""
