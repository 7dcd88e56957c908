"""peftcli: parameter-efficient fine-tuning of causal language models from one YAML recipe."""

__version__ = "0.1.0"
