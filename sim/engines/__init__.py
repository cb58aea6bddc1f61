"""The simulation engines: the batch-level engine (static), the step engine (continuous), and the fleet and
waiting room they share."""
