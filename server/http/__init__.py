"""The HTTP surface: the app, the gateways (our API and OpenAI's), errors, the access log."""
