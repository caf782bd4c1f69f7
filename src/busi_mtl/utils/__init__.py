"""Helpers shared by the entry points: config location, instantiation, run metadata."""
