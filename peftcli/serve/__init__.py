"""`peftcli serve`: an OpenAI-compatible HTTP server over a base model and its adapters."""
