"""What the service keeps: jobs, their transitions and events, alerts, users and tokens (store.py)."""
