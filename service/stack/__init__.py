"""The local monitoring stack: the Prometheus and Alertmanager `gradwatch up` supervises (monitoring.py)
and the dashboards it pushes to Grafana (grafana.py)."""
