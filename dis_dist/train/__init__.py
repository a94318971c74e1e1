"""Training: the loop, checkpoints, EMA, schedules, logging."""
