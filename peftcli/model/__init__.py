"""The base model and the machine it runs on: loading, checks without weights, devices, memory size, speed settings."""
