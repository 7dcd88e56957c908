"""Base vs tuned, and generation with several adapters on one base."""
