"""Questions asked of many simulations: the GPU count that meets the SLOs, the latency knee."""
