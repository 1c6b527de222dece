"""Training, evaluation, checkpoints and distributed set-up (used by the CLI)."""
