from django.urls import include, path

from . import views

urlpatterns = [
    path("health", views.health),
    path("v1/ai/complete", views.ai_complete),
    path("v1/emails", views.send_email),
    path("v1/contacts", views.create_contact),
    path("v1/contacts/<int:contact_id>", views.delete_contact),
    path("settings/usage/", include("usage_guard.django.urls")),
]
