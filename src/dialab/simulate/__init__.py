"""Simulated data built on GalSim: star fields, image pairs and survey datasets."""
