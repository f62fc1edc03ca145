"""Faults provoked on purpose (bad data, damaged checkpoints, killed processes, DDP); each test is one case."""
