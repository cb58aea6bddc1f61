"""Result models and their renderings (terminal, JSON, Markdown, HTML)."""
