"""Sleuth api layer."""
