"""``path("settings/usage/", include("usage_guard.django.urls"))``: the Usage page, its JSON
and its admin endpoints (``reverse("usage_guard:usage")`` is the page)."""

from __future__ import annotations

from django.urls import re_path

from .views import usage

app_name = "usage_guard"
urlpatterns = [re_path(r"^(?P<path>.*)\Z", usage, name="usage")]
