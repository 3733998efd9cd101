"""Callbacks that attach gradwatch to a framework's own trainer (Hugging Face, Lightning)."""
