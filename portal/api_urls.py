"""Management API under /api/ (owned by the management-API module)."""

urlpatterns: list = []
