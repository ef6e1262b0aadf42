"""The capacity planner: the platform's economics (GPU cost per backend-hour, cost of serving N tenants) are for
platform staff; a tenant sees what fits (issue 14, item 7)."""

from __future__ import annotations

from serving.models import BackendPool


def test_planner_shows_gpu_costs_to_staff_only(client, world, base_model):
    pool = BackendPool.objects.create(name="tiny", base_model=base_model, kind="dev", gpu_memory_gb=1, gpu_hourly_cost_cents=250)
    page = f"/t/acme/finetune/planner/?pool={pool.pk}&rank=8&memory_gb=0.001"
    client.force_login(world.admin)
    html = client.get(page).content.decode()
    assert "Adapters that fit" in html and "per backend-hour" not in html and "Serving N tenants" not in html
    world.admin.is_staff = True
    world.admin.save()
    client.force_login(world.admin)
    assert "250 ¢ per backend-hour" in client.get(page).content.decode()
