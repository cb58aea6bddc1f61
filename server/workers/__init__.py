"""The GPU workers: the batch pool and continuous batching."""
