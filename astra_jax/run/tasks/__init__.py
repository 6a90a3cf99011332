"""Glue between a model family, its data and the CLIs (train/, infer/)."""
