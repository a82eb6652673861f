"""Rectified-flow schedules, Euler updates and the jitted FLUX sampler."""
