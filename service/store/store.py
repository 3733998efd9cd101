"""The store: one database (engine.py) and the aggregates kept in it, each with its own queries:
`store.jobs` (jobs.py), `store.users` (users.py, users and tokens) and `store.alerts` (alerts.py)."""

from __future__ import annotations

from service.store.alerts import Alerts
from service.store.engine import Database
from service.store.jobs import Jobs
from service.store.users import Users


class Store:
    """The service's store on one SQLAlchemy URL; thread-safe. Objects it returns are detached snapshots."""

    def __init__(self, url: str):
        self.url = url
        self.db = Database(url)
        self.engine = self.db.engine
        self.jobs = Jobs(self.db)
        self.users = Users(self.db)
        self.alerts = Alerts(self.db)

    def close(self) -> None:
        self.db.close()
