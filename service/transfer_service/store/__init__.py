"""Durable state: heads (safetensors + JSON), jobs and their events, uploaded datasets."""
