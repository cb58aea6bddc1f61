"""Independent per-request models the engines are held to, request by request."""
