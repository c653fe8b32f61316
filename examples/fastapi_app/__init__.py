"""A small CRM-like FastAPI app metered by usage_guard (see ``app.py``)."""
