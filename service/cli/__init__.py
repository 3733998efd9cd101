"""The `gradwatch` command: its app and `run` (main.py), the service's jobs and `up` (jobs.py), `replay`
(replay.py), `report` (report.py) and `user` (users.py)."""
