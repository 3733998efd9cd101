"""The HTTP API: routes (routes.py), what they accept and return (models.py), the OpenAPI document
(openapi.py), and the server that serves them (serving.py, main.py)."""
