"""Scaling-law analysis of a sweep: trendlines, compute parity, Chinchilla fits, isoFLOP minima."""
