"""Console pages (owned by the console module)."""

urlpatterns: list = []
