"""``path("settings/usage/", include("usage_guard.django.urls"))``: the Usage page, its JSON
and its admin endpoints (``reverse("usage_guard:usage")`` is the page)."""

from __future__ import annotations

from django.urls import path, re_path

from .views import usage

app_name = "usage_guard"
urlpatterns = [
    path("", usage, name="usage"),
    re_path(r"^(?P<path>.+)\Z", usage, name="usage-below"),
]
