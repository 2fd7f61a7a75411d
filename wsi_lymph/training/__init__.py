"""Training as in the paper: data sets, synthetic data, patches, folds, training and cross-validation."""
