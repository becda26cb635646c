"""Sleuth's lowest layer: settings, errors, decoding, descriptors, the SQL store and the vector indexes."""
