"""Inference: sliding windows over slabs of T slices, and the volume-level predictor."""
