"""Running jobs: the launcher that places queued jobs on the Ray cluster and watches them (launcher.py),
and the drivers' progress pushes it reads while a job runs (push.py)."""
