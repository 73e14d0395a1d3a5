"""Driving the model: prefill and decode loops (generate.py), sampling (sampling.py), and teacher files of
log-probabilities for distillation (teacher.py)."""
