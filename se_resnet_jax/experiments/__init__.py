"""The study's experiments, one command each: ablation, hyperparameter search, k-fold validation."""
