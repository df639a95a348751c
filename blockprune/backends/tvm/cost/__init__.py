"""Measured costs: break-even densities (calibrate) and the table shipped for x86-64."""
