"""Training functions of your own under gradwatch (docs/training-api.md)."""
