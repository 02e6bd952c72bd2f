"""The FastAPI example: a notes API on poolkit; run it with `python -m example_apps.fastapi_app`."""
