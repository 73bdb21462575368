"""Inference: predicting label maps from a trained run (flip, upsample, assign, dense CRF),
scoring them against labels, and writing segments and figures."""
