"""What the service keeps, one module per part: `Store` (store.py) composes the jobs aggregate (jobs.py:
jobs, their labels, transitions and drivers' reports), users and tokens (users.py) and alerts (alerts.py)
on one database (engine.py: engine, tables made and checked, sessions), over the tables in tables.py;
errors.py holds what they raise."""
