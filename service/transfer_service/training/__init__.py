"""Fine-tuning: request validation, data split, feature cache, trainer and the job manager."""
