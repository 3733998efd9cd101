"""The parts of the training API's `Run` (workers/training.py), each with a narrow interface of its own:
the update guard (guard.py), the steps' recording and named series (recording.py), checkpoints with
rollback and rewind (checkpoints.py), and the progress and reports for the driver (progress.py).
`Run` stays the public facade and hands each part only what it needs."""
