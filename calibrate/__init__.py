"""Calibration: measure an engine's batch time (synthetic batches or a server's traffic), fit it, write a profile.

A profile is a layer of the service model (``simulate|capacity|loadtest --profile``),
so the simulator plans with the engine's measured cycle and its spread.
"""
