"""Workload inputs: arrivals and their schedules, token lengths, datasets and traces, scenario files."""
