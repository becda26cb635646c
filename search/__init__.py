"""Sleuth search layer."""
