"""Sleuth projection layer."""
