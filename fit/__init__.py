"""Losses, the stacked linear-head engine, the ROLE label estimator and fine-tuning."""
