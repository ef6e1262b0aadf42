from django.urls import path

from serving import views

urlpatterns = [
    path("t/<slug:tenant_slug>/usage/", views.usage, name="console-usage"),
    path("t/<slug:tenant_slug>/usage/export.csv", views.usage_export, name="console-usage-export"),
    path("t/<slug:tenant_slug>/models/", views.models_page, name="console-models"),
    path("t/<slug:tenant_slug>/playground/", views.playground, name="console-playground"),
]
