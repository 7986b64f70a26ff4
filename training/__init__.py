"""Training: the config, the batch plan and the Trainer behind train_ds.py."""
