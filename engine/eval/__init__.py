"""Evaluation of frozen backbone features: datasets, feature extraction, weighted k-NN, linear probe, `ibot eval`."""
