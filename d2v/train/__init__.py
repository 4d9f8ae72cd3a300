"""Training: loop, optimizer and schedules."""
