"""Merged models for isolated tenants (finetune/merge.py): the merge itself (the merged model answers as base + adapter,
token for token, and has the base model's shapes and size), the routing rule (serving.routing.routes_for: the
adapter's name goes to the tenant's dedicated pool, and nowhere else, only while the merged model serves), who may ask
and what is refused, the worker, staff's Serve, and the planner's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import merge, planning
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool, BaseModel, MergedModel
from serving.routing import tenant_routes
from tenants.models import AuditEvent
from tenants.services import SYSTEM, Actor
from tests.support.management_api import as_key, as_user, make_key
from tests.support.vllm_fake import FakeVLLM

PROMPTS = ["the cat sees a book", "Hello 👋 how are you? 🌍🚀", "你好，世界！今天天气怎么样？", "The answer is 42.",
           "Ünïcödé façade — naïve café"]


def peft_adapter(base: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA of the tiny model as peft saves it, with large random A and B so that it changes every answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged_dir(tiny_model_path, tmp_path_factory):
    """(adapter folder, merged folder, MergeResult): the tiny model's adapter merged once for this module."""
    root = tmp_path_factory.mktemp("merge")
    adapter = peft_adapter(tiny_model_path, root / "adapter")
    result = merge.merge_adapter(base_model_path=tiny_model_path, adapter_dir=adapter, output_dir=root / "merged",
                                 served_name="ft:tiny-chat:acme:m:1")
    return adapter, root / "merged", result


# ---- the merge ------------------------------------------------------------------------------------------------------


def test_the_merged_folder_has_the_base_models_tensors_shapes_and_size_and_the_served_name(tiny_model_path, merged_dir):
    from safetensors import safe_open

    _, folder, result = merged_dir
    with safe_open(tiny_model_path / "model.safetensors", "pt") as base, safe_open(folder / "model.safetensors", "pt") as merged:
        base_shapes = {k: tuple(base.get_slice(k).get_shape()) for k in base.keys()}
        merged_shapes = {k: tuple(merged.get_slice(k).get_shape()) for k in merged.keys()}
        assert merged_shapes == base_shapes  # no lora_A / lora_B left, nothing added
        assert not any("lora" in k for k in merged_shapes)
        changed = [k for k in base.keys() if not base.get_tensor(k).equal(merged.get_tensor(k))]
    # the adapted modules, and only those, changed: 2 layers x q, v, o, down
    assert sorted(changed) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                     for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"))
    assert result.parameters == 132_672  # the tiny model's own count (tied embeddings once)
    assert result.weights_bytes == (tiny_model_path / "model.safetensors").stat().st_size == (folder / "model.safetensors").stat().st_size
    assert result.dtype == "float32" and result.size_bytes == sum(f.stat().st_size for f in folder.iterdir())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (folder / name).read_bytes() == (tiny_model_path / name).read_bytes() or name == "config.json"
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((folder / "platform_model.json").read_text())["model_id"] == "ft:tiny-chat:acme:m:1"
    assert not list(folder.parent.glob(".merged.*"))  # the staging folder was renamed, not left behind


def test_a_merge_refuses_what_it_cannot_merge_and_leaves_nothing(tiny_model_path, merged_dir, tmp_path):
    adapter, folder, _ = merged_dir
    with pytest.raises(merge.MergeError, match="no adapter_config.json"):
        merge.merge_adapter(base_model_path=tiny_model_path, adapter_dir=tmp_path, output_dir=tmp_path / "out", served_name="x")
    with pytest.raises(merge.MergeError, match="exists already"):
        merge.merge_adapter(base_model_path=tiny_model_path, adapter_dir=adapter, output_dir=folder, served_name="x")
    config = json.loads((adapter / "adapter_config.json").read_text())
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    (wrong / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(merge.MergeError):
        merge.merge_adapter(base_model_path=tiny_model_path, adapter_dir=wrong, output_dir=tmp_path / "out", served_name="x")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.slow
def test_the_merged_model_answers_as_base_plus_adapter_token_for_token(tiny_model_path, merged_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, folder, _ = merged_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()

    def greedy(model, ids):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()

    differs_from_base = 0
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        answer = greedy(merged, ids)
        assert answer  # up to 32 tokens, or to its end of turn
        assert answer == greedy(lora, ids), prompt
        differs_from_base += answer != greedy(base, ids)
    assert differs_from_base == len(PROMPTS)  # the adapter is really applied


# ---- rows for the service, the API and routing ---------------------------------------------------------------------


@pytest.fixture
def rows(world, base_model, tiny_model_path, tmp_path):
    """acme: a shared pool of the tiny model, a pool dedicated to acme, and acme's adapter (real peft files)."""
    shared = BackendPool.objects.create(name="shared-tiny", base_model=base_model, kind="vllm", gpu_memory_gb=80, capacity=4)
    dedicated = BackendPool.objects.create(name="acme-tiny", base_model=base_model, kind="vllm", dedicated_tenant=world.tenant,
                                           gpu_memory_gb=80, capacity=8)
    Backend.objects.create(pool=shared, url="http://shared.invalid:1")
    path = peft_adapter(tiny_model_path, tmp_path / "adapter")
    adapter = Adapter.objects.for_tenant(world.tenant).create(name="ft:tiny-chat:acme:m:1", base_model=base_model,
                                                              path=str(path), rank=4)
    return shared, dedicated, adapter


def _merged(world, adapter, pool, state="serving", tenant=None) -> MergedModel:
    return MergedModel.objects.for_tenant(tenant or world.tenant).create(adapter=adapter, pool=pool, state=state, path="/m")


def test_the_adapters_name_routes_to_the_dedicated_pool_only_while_its_merged_model_serves(world, rows):
    shared, dedicated, adapter = rows
    AdapterDeployment.objects.for_tenant(world.tenant).create(adapter=adapter, pool=shared, state="active")
    before = tenant_routes(world.tenant)
    assert before[adapter.name].pool_id == shared.pk and before[adapter.name].model_id is None  # base + LoRA
    assert before["tiny-chat"].pool_id == dedicated.pk  # isolated tenancy: the base model on its own pool

    merged = _merged(world, adapter, dedicated, state="ready")
    assert tenant_routes(world.tenant) == before  # ready is not serving: the backends may not run it yet

    MergedModel.objects.for_tenant(world.tenant).filter(pk=merged.pk).update(state="serving")
    routes = tenant_routes(world.tenant)
    route = routes[adapter.name]
    assert (route.pool_id, route.model_id, route.adapter, route.base_model, route.owned_by) == (
        dedicated.pk, adapter.name, adapter.name, "tiny-chat", "acme")
    # the dedicated pool's backends run the merged weights: nothing else is sent there
    assert [name for name, r in routes.items() if r.pool_id == dedicated.pk] == [adapter.name]
    assert routes["tiny-chat"].pool_id == shared.pk
    # and no other tenant can call it, or reach the pool
    other = tenant_routes(world.other_tenant)
    assert adapter.name not in other and all(r.pool_id != dedicated.pk for r in other.values())


def test_a_merged_model_is_routed_nowhere_off_its_tenants_dedicated_pool_of_its_base_model(world, rows):
    shared, dedicated, adapter = rows
    _merged(world, adapter, shared)  # a hand-made row on the shared pool
    routes = tenant_routes(world.tenant)
    assert adapter.name not in routes and routes["tiny-chat"].pool_id == dedicated.pk
    MergedModel.all_tenants.all().delete()

    globex_pool = BackendPool.objects.create(name="globex-tiny", base_model=shared.base_model, kind="vllm",
                                             dedicated_tenant=world.other_tenant)
    _merged(world, adapter, globex_pool, tenant=world.other_tenant)  # globex's row naming acme's adapter
    assert adapter.name not in tenant_routes(world.other_tenant) and adapter.name not in tenant_routes(world.tenant)
    MergedModel.all_tenants.all().delete()

    other_base = BaseModel.objects.create(name="other-base", hf_id="x/other")
    other_pool = BackendPool.objects.create(name="acme-other", base_model=other_base, kind="vllm", dedicated_tenant=world.tenant)
    _merged(world, adapter, other_pool)  # weights it was not merged into
    routes = tenant_routes(world.tenant)
    assert adapter.name not in routes and routes["other-base"].pool_id == other_pool.pk


def test_the_gateway_snapshot_routes_it_and_asks_the_backend_for_the_merged_model_without_an_adapter(world, rows):
    from serving.config import load_snapshot
    from serving.gateway import endpoints as E
    from serving.gateway.parsing import build_backend_request, parse_request
    from serving.gateway.plan import plan_request

    shared, dedicated, adapter = rows
    Backend.objects.create(pool=dedicated, url="http://dedicated.invalid:1")
    _merged(world, adapter, dedicated)
    snap = load_snapshot()
    tenant = snap.tenants[world.tenant.pk]
    assert tenant.models[adapter.name].model_id == adapter.name
    assert adapter.name not in snap.tenants[world.other_tenant.pk].models

    def chat(model: str):
        return parse_request(E.CHAT, {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

    plan = plan_request(chat(adapter.name), tenant, snap.pools)  # no 503: no backend lists it as a LoRA, and need not
    assert plan.pool.id == dedicated.pk
    assert (plan.backend_request.adapter, plan.backend_request.model_id) == (None, adapter.name)
    assert plan.route.adapter == adapter.name  # the ledger and prices still name the version
    base = build_backend_request(chat("tiny-chat"), tenant, tenant.models["tiny-chat"], snap.pools[shared.pk], 4)
    assert (base.adapter, base.model_id) == (None, "platform/tiny-chat")


# ---- asking for a merge: who may, what is refused ------------------------------------------------------------------


def _merge_url(world, adapter_id: int, slug: str | None = None) -> str:
    return f"/api/tenants/{slug or world.tenant.slug}/adapters/{adapter_id}/merge/"


def test_an_admin_asks_a_worker_merges_and_the_merged_model_is_ready_with_its_size(world, rows, django_capture_on_commit_callbacks,
                                                                                  settings, tiny_model_path):
    shared, dedicated, adapter = rows
    with django_capture_on_commit_callbacks(execute=True):  # the worker's task runs eagerly once the request commits
        r = as_user(world.admin).post(_merge_url(world, adapter.pk))
    assert r.status_code == 202, r.content
    assert r.json()["state"] == "queued" and r.json()["pool"] == "acme-tiny"
    merged = MergedModel.objects.for_tenant(world.tenant).get()
    assert merged.state == "ready", merged.error
    folder = Path(merged.path)
    assert folder.is_relative_to(Path(settings.STORAGE_DIR) / "tenants" / str(world.tenant.pk) / "merged")
    assert (folder / "model.safetensors").stat().st_size == merged.weights_bytes == (tiny_model_path / "model.safetensors").stat().st_size
    assert (merged.parameters, merged.dtype) == (132_672, "float32") and merged.size_bytes > merged.weights_bytes
    actions = list(AuditEvent.objects.for_tenant(world.tenant).filter(action__startswith="finetune.merge")
                   .order_by("id").values_list("action", "actor_id"))
    assert actions == [("finetune.merge_requested", world.admin.pk), ("finetune.merge_ready", None)]
    listing = as_user(world.viewer).get(f"/api/tenants/acme/merged-models/").json()
    assert [(m["adapter"], m["state"], m["size_bytes"]) for m in listing] == [(adapter.name, "ready", merged.size_bytes)]
    # asking again changes nothing
    with django_capture_on_commit_callbacks(execute=True):
        again = as_user(world.admin).post(_merge_url(world, adapter.pk))
    assert again.status_code == 202 and again.json()["state"] == "ready" and MergedModel.objects.for_tenant(world.tenant).count() == 1


def test_a_merge_that_fails_says_why_and_can_be_asked_again(world, rows, django_capture_on_commit_callbacks):
    shared, dedicated, adapter = rows
    real = adapter.path
    Adapter.objects.for_tenant(world.tenant).filter(pk=adapter.pk).update(path="/nowhere")
    with django_capture_on_commit_callbacks(execute=True):
        as_user(world.admin).post(_merge_url(world, adapter.pk))
    merged = MergedModel.objects.for_tenant(world.tenant).get()
    assert merged.state == "failed" and "no adapter_config.json in /nowhere" in merged.error
    Adapter.objects.for_tenant(world.tenant).filter(pk=adapter.pk).update(path=real)
    with django_capture_on_commit_callbacks(execute=True):
        assert as_user(world.admin).post(_merge_url(world, adapter.pk)).status_code == 202
    merged.refresh_from_db()
    assert merged.state == "ready" and merged.error == ""


def test_refusals_no_dedicated_pool_another_base_model_no_weights(world, rows):
    shared, dedicated, adapter = rows
    admin = as_user(world.admin)
    BackendPool.objects.filter(pk=dedicated.pk).update(dedicated_tenant=None)
    r = admin.post(_merge_url(world, adapter.pk))
    assert r.status_code == 409 and r.json()["code"] == "no_dedicated_pool", r.json()
    assert "dedicated to your account" in r.json()["detail"]
    other = BaseModel.objects.create(name="other-base", hf_id="x/other", local_path="/x")
    BackendPool.objects.filter(pk=dedicated.pk).update(dedicated_tenant=world.tenant, base_model=other)
    r = admin.post(_merge_url(world, adapter.pk))
    assert r.status_code == 409 and r.json()["code"] == "base_model_not_served"
    assert r.json()["detail"].startswith("Your dedicated pools serve other base models (acme-tiny (other-base)), not tiny-chat")
    BackendPool.objects.filter(pk=dedicated.pk).update(base_model=shared.base_model)
    BaseModel.objects.filter(pk=shared.base_model_id).update(local_path="")
    r = admin.post(_merge_url(world, adapter.pk))
    assert r.status_code == 409 and r.json()["code"] == "base_weights_missing"
    assert not MergedModel.all_tenants.exists() and not AuditEvent.objects.for_tenant(world.tenant).filter(action="finetune.merge_requested").exists()


def test_another_tenants_adapter_is_404_and_under_privileged_callers_are_refused(world, rows, base_model):
    shared, dedicated, adapter = rows
    theirs = Adapter.objects.for_tenant(world.other_tenant).create(name="ft:tiny-chat:globex:g:2", base_model=base_model, path="/g")
    assert as_user(world.admin).post(_merge_url(world, theirs.pk)).status_code == 404  # globex's adapter, acme's URL
    assert as_user(world.outsider).post(_merge_url(world, adapter.pk)).status_code == 404  # acme's URL, an outsider
    assert as_user(world.outsider).post(_merge_url(world, adapter.pk, slug="globex")).status_code == 404  # acme's id, globex's URL
    assert as_user(world.outsider).get("/api/tenants/acme/merged-models/").status_code == 404
    for user in (world.viewer, world.developer):
        assert as_user(user).post(_merge_url(world, adapter.pk)).status_code == 403
    _, read_only = make_key(world.tenant, scopes=("management:read",))
    assert as_key(read_only).post(_merge_url(world, adapter.pk)).status_code == 403
    assert not MergedModel.all_tenants.exists()
    _, writer = make_key(world.tenant)
    assert as_key(writer).post(_merge_url(world, adapter.pk)).status_code == 202


def test_the_console_offers_the_merge_to_admins_and_shows_the_pools_memory_need(world, rows, client, django_capture_on_commit_callbacks):
    shared, dedicated, adapter = rows
    client.force_login(world.viewer)
    page = client.get("/t/acme/finetune/adapters/").content.decode()
    assert "Merged models" in page and "Merge for acme-tiny" not in page
    assert client.post(f"/t/acme/finetune/adapters/{adapter.pk}/merge/").status_code == 403
    client.force_login(world.outsider)
    assert client.post(f"/t/acme/finetune/adapters/{adapter.pk}/merge/").status_code == 404
    client.force_login(world.admin)
    assert "Merge for acme-tiny" in client.get("/t/acme/finetune/adapters/").content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/t/acme/finetune/adapters/{adapter.pk}/merge/")
    assert r.status_code == 302
    page = client.get("/t/acme/finetune/adapters/").content.decode()
    assert "Merge for acme-tiny" not in page and "merged: Ready" in page
    plan = planning.merged_model_plan(pool=dedicated, merged=MergedModel.objects.for_tenant(world.tenant).get())
    assert f"for {plan['concurrency']} × 1024 tokens" in page and "fits in" in page
    # a tenant without a dedicated pool sees no merge at all
    BackendPool.objects.filter(pk=dedicated.pk).update(dedicated_tenant=None)
    assert "Merged models" not in client.get("/t/acme/finetune/adapters/").content.decode()


def test_the_planner_counts_the_merged_models_weights_and_kv_cache_against_the_pools_memory(world, rows):
    shared, dedicated, adapter = rows
    plan = planning.merged_model_plan(pool=dedicated)  # before the merge: the base model's figures
    assert plan["parameters"] == 132_672  # computed from config.json: the merged model's own count, measured above
    assert plan["weights_gpu_bytes"] == 132_672 * 2
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 2  # K and V, 2 layers, 2 KV heads of 32, bf16
    assert plan["kv_cache_bytes"] == 512 * 1024 * 8  # the full context for each of the pool's 8 concurrent requests
    assert plan["need_bytes"] == 265_344 + 4_194_304
    assert plan["available_bytes"] == int(80 * 1024 ** 3 * 0.9) and plan["fits"] is True
    BackendPool.objects.filter(pk=dedicated.pk).update(gpu_memory_gb=0)
    dedicated.refresh_from_db()
    assert planning.merged_model_plan(pool=dedicated)["fits"] is None  # unknown memory: no verdict


# ---- staff serve it once the pool's backends run it ----------------------------------------------------------------


@pytest.fixture
def fakes():
    started = []

    def start(model: str) -> FakeVLLM:
        started.append(FakeVLLM(model=model))
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


def test_staff_serve_it_only_once_every_backend_of_the_pool_runs_it_and_can_stop(world, rows, fakes):
    shared, dedicated, adapter = rows
    merged = _merged(world, adapter, dedicated, state="ready")
    with pytest.raises(merge.MergeRefused, match="no enabled backend"):
        merge.merged_model_serve(merged=merged, actor=SYSTEM)
    on_base = fakes("platform/tiny-chat")
    backend = Backend.objects.create(pool=dedicated, url=on_base.url)
    with pytest.raises(merge.MergeRefused) as refused:
        merge.merged_model_serve(merged=merged, actor=SYSTEM)
    assert refused.value.code == "backends_not_restarted" and on_base.url in refused.value.message
    assert "(platform/tiny-chat)" in refused.value.message and adapter.name not in tenant_routes(world.tenant)
    restarted = fakes(adapter.name)  # `vllm serve <folder> --served-model-name <adapter name>`
    Backend.objects.filter(pk=backend.pk).update(url=restarted.url)
    merge.merged_model_serve(merged=merged, actor=Actor(user=world.admin))
    merged.refresh_from_db()
    assert merged.state == "serving" and merged.serving_since is not None
    assert tenant_routes(world.tenant)[adapter.name].pool_id == dedicated.pk
    merge.merged_model_stop(merged=merged, actor=SYSTEM)
    assert merged.state == "ready" and adapter.name not in tenant_routes(world.tenant)
    assert list(AuditEvent.objects.for_tenant(world.tenant).filter(action__startswith="finetune.merge").order_by("id")
                .values_list("action", flat=True)) == ["finetune.merge_serving", "finetune.merge_stopped"]


def test_staff_serve_from_the_admin(world, rows, fakes, admin_client):
    shared, dedicated, adapter = rows
    merged = _merged(world, adapter, dedicated, state="ready")
    Backend.objects.create(pool=dedicated, url=fakes(adapter.name).url)
    page = admin_client.get(f"/admin/serving/mergedmodel/{merged.pk}/change/").content.decode()
    assert f"--served-model-name {adapter.name}" in page and "GPU memory needed" in page
    r = admin_client.post("/admin/serving/mergedmodel/", {"action": "serve_merged_models", "_selected_action": [merged.pk]}, follow=True)
    assert [str(m) for m in r.context["messages"]] == [f"{adapter.name} serves on acme-tiny."]
    merged.refresh_from_db()
    assert merged.state == "serving"


def test_while_a_merged_model_serves_new_adapters_are_deployed_to_the_shared_pool_not_onto_the_merged_weights(world, rows, base_model):
    from finetune import deploy

    shared, dedicated, adapter = rows
    second = Adapter.objects.for_tenant(world.tenant).create(name="ft:tiny-chat:acme:n:2", base_model=base_model, path="/n", rank=4)
    assert deploy.pools.pool_for_adapter(world.tenant, base_model) == dedicated  # isolated tenancy: its own pool first
    _merged(world, adapter, dedicated)
    assert deploy.pools.pool_for_adapter(world.tenant, base_model) == shared  # as routing: the pool runs merged weights
    BackendPool.objects.filter(pk=shared.pk).delete()
    assert deploy.pools.pool_for_adapter(world.tenant, base_model) is None
    with pytest.raises(deploy.DeployError, match="No pool serves tiny-chat"):
        deploy.adapter_deploy(tenant=world.tenant, adapter=second, actor=SYSTEM)


# ---- the lease: a worker that dies mid-merge ---------------------------------------------------------------------


def _merging(world, adapter, pool, *, worker_id="merge-dead", beat_ago_s: float | None = None) -> MergedModel:
    from datetime import timedelta

    from django.utils import timezone

    beat = None if beat_ago_s is None else timezone.now() - timedelta(seconds=beat_ago_s)
    return MergedModel.objects.for_tenant(world.tenant).create(adapter=adapter, pool=pool, state="merging",
                                                               worker_id=worker_id, worker_heartbeat_at=beat)


def test_a_merge_whose_worker_died_is_swept_and_taken_over_by_the_next_worker(world, rows, monkeypatch):
    from finetune import tasks

    shared, dedicated, adapter = rows
    merged = _merging(world, adapter, dedicated, beat_ago_s=1)  # its worker alive: said so a second ago
    assert merge.merged_stale() == []
    assert merge.merged_model_build(merged_id=merged.pk, tenant_id=world.tenant.pk) == "leased"
    assert MergedModel.objects.for_tenant(world.tenant).get().worker_id == "merge-dead"  # left to it
    MergedModel.objects.for_tenant(world.tenant).filter(pk=merged.pk).update(
        worker_heartbeat_at=merged.created_at.replace(year=2025))  # silent for far longer than a lease
    assert merge.merged_stale() == [(merged.pk, world.tenant.pk)]
    sent = []
    monkeypatch.setattr(tasks.merge_adapter, "delay", lambda *args: sent.append(args))
    assert tasks.requeue_stale_merges() == 1 and sent == [(merged.pk, world.tenant.pk)]
    assert merge.merged_model_build(merged_id=merged.pk, tenant_id=world.tenant.pk) == "ready"
    merged.refresh_from_db()
    assert merged.state == "ready" and merged.worker_id.startswith("merge-") and merged.worker_id != "merge-dead"
    assert (Path(merged.path) / "model.safetensors").is_file() and merge.merged_stale() == []
    assert merge.merged_model_build(merged_id=merged.pk, tenant_id=world.other_tenant.pk) == "gone"  # another tenant's id


def test_asking_again_for_a_merge_stuck_on_a_dead_worker_sends_it_again(world, rows, django_capture_on_commit_callbacks):
    shared, dedicated, adapter = rows
    merged = _merging(world, adapter, dedicated)  # claimed, never a heartbeat: the worker died at once
    with django_capture_on_commit_callbacks(execute=True):
        r = as_user(world.admin).post(_merge_url(world, adapter.pk))
    assert r.status_code == 202, r.content
    merged.refresh_from_db()
    assert merged.state == "ready", merged.error


@pytest.mark.django_db(transaction=True)  # the heartbeat thread has its own database connection: it sees committed rows
def test_the_lease_is_renewed_while_the_merge_runs_and_a_taken_over_worker_keeps_nothing(world, rows, monkeypatch):
    import time

    from finetune import models as finetune_models

    shared, dedicated, adapter = rows
    monkeypatch.setattr(finetune_models, "LEASE_SECONDS", 0.8)  # a beat every 0.2 s
    real = merge.merge_adapter
    beats = []

    def slow_merge(**kw):
        result = real(**kw)
        for _ in range(3):
            time.sleep(0.3)
            beats.append(MergedModel.objects.for_tenant(world.tenant).get().worker_heartbeat_at)
        return result

    monkeypatch.setattr(merge, "merge_adapter", slow_merge)
    merged = MergedModel.objects.for_tenant(world.tenant).create(adapter=adapter, pool=dedicated)
    assert merge.merged_model_build(merged_id=merged.pk, tenant_id=world.tenant.pk) == "ready"
    assert beats[0] < beats[-1]  # renewed while it ran (about four beats in those 0.9 s; one is enough to say so)

    # A worker whose lease another took over meanwhile (it was presumed dead) writes nothing and removes its folder.
    folders = []

    def overtaken(**kw):
        result = real(**kw)
        folders.append(result.output_dir)
        MergedModel.objects.for_tenant(world.tenant).filter(pk=again.pk).update(worker_id="merge-other")
        return result

    monkeypatch.setattr(merge, "merge_adapter", overtaken)
    MergedModel.objects.for_tenant(world.tenant).filter(pk=merged.pk).delete()
    again = MergedModel.objects.for_tenant(world.tenant).create(adapter=adapter, pool=dedicated)
    assert merge.merged_model_build(merged_id=again.pk, tenant_id=world.tenant.pk) == "lost"
    again.refresh_from_db()
    assert (again.state, again.worker_id, again.path) == ("merging", "merge-other", "")
    assert not folders[0].exists()


# ---- a deleted merged model's folder ----------------------------------------------------------------------------------


def test_a_deleted_merged_models_folder_goes_once_the_deletion_commits(world, rows, settings, tmp_path,
                                                                       django_capture_on_commit_callbacks):
    from django.db import transaction

    shared, dedicated, adapter = rows
    root = Path(settings.STORAGE_DIR) / "tenants" / str(world.tenant.pk) / "merged"

    def merged_with_folder(name: str) -> MergedModel:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        return MergedModel.objects.for_tenant(world.tenant).create(adapter=adapter, pool=dedicated, state="ready",
                                                                   path=str(folder))

    merged = merged_with_folder("1-a")
    with pytest.raises(RuntimeError), transaction.atomic():  # a delete rolled back keeps the folder
        MergedModel.objects.for_tenant(world.tenant).filter(pk=merged.pk).delete()
        raise RuntimeError
    assert Path(merged.path).is_dir() and MergedModel.objects.for_tenant(world.tenant).filter(pk=merged.pk).exists()
    with django_capture_on_commit_callbacks(execute=True):  # staff's delete in the admin
        MergedModel.objects.for_tenant(world.tenant).get(pk=merged.pk).delete()
    assert not Path(merged.path).exists() and root.is_dir()

    again = merged_with_folder("2-b")
    with django_capture_on_commit_callbacks(execute=True):  # the adapter's deletion cascades to it
        Adapter.objects.for_tenant(world.tenant).filter(pk=adapter.pk).delete()
    assert not MergedModel.objects.for_tenant(world.tenant).exists() and not Path(again.path).exists()


def test_a_merged_model_naming_a_folder_outside_its_tenants_storage_leaves_it(world, rows, tmp_path,
                                                                            django_capture_on_commit_callbacks):
    shared, dedicated, adapter = rows
    elsewhere = tmp_path / "somebody-elses"
    elsewhere.mkdir()
    merged = MergedModel.objects.for_tenant(world.tenant).create(adapter=adapter, pool=dedicated, state="ready",
                                                                 path=str(elsewhere))
    with django_capture_on_commit_callbacks(execute=True):
        merged.delete()
    assert elsewhere.is_dir()


def test_an_unexpected_failure_mid_merge_fails_the_merge_in_words_and_leaves_no_folder(world, rows, monkeypatch):
    """Not left `merging` for the sweep to retry forever: `failed`, saying what happened and what to do."""
    shared, dedicated, adapter = rows
    written = []

    def broken(**kw):
        kw["output_dir"].mkdir(parents=True)
        written.append(kw["output_dir"])
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(merge, "merge_adapter", broken)
    merged = MergedModel.objects.for_tenant(world.tenant).create(adapter=adapter, pool=dedicated)
    assert merge.merged_model_build(merged_id=merged.pk, tenant_id=world.tenant.pk) == "failed"
    merged.refresh_from_db()
    assert merged.state == "failed" and merged.finished_at is not None and merge.merged_stale() == []
    assert merged.error.startswith("The merge failed unexpectedly (RuntimeError: CUDA out of memory); ask again")
    assert not written[0].exists()
