"""Turning checkpoints, plans and checks into JSON objects and human-readable text."""
