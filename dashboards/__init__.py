"""Grafana dashboards as code: fleet, run and ranks boards (see dashboards/build.py)."""
