"""Callbacks for the frameworks' own trainers: `gradwatch.integrations.transformers` and `.lightning`."""
