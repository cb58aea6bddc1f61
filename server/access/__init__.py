"""Who may send what: API keys and their per-key rate and in-flight limits."""
