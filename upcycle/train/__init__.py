"""Fine-tuning: recipe schema, the training loop, losses and metrics."""
