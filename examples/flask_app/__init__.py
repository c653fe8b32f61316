"""A small CRM-like Flask app metered by usage_guard (see ``app.py``)."""
