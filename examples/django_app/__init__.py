"""A small CRM-like Django project metered by usage_guard (see ``views.py``)."""
