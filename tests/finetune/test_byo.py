"""Bring your own adapter (finetune/byo.py): a tenant's PEFT LoRA is checked against its base model and its pool
before anything is stored or served, refused with the reason, and a valid one is deployed like a trained one."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from finetune import byo
from serving.models import Adapter, AdapterDeployment, BackendPool, BaseModel
from tenants import services as tenant_services
from tenants.models import AuditEvent
from tenants.services import Actor
from tests.support.adapters import DIMS, lora_config, safetensors_bytes, tensors_for

TINY = {"hidden": 64, "heads": 2, "head_dim": 32, "intermediate": 176, "layers": 2}


def two_files(config: dict | None = None, weights: bytes | None = None) -> list:
    return [SimpleUploadedFile("adapter_config.json", json.dumps(config or lora_config()).encode()),
            SimpleUploadedFile("adapter_model.safetensors", weights if weights is not None else safetensors_bytes(tensors_for()))]


def zip_of(members: dict[str, bytes], name: str = "adapter.zip", compression=zipfile.ZIP_STORED) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return SimpleUploadedFile(name, buffer.getvalue())


def tar_of(members: dict[str, bytes], name: str = "adapter.tar.gz", links: dict[str, str] | None = None) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for member, target in (links or {}).items():
            info = tarfile.TarInfo(member)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return SimpleUploadedFile(name, buffer.getvalue())


def valid_members(folder: str = "") -> dict[str, bytes]:
    return {f"{folder}adapter_config.json": json.dumps(lora_config()).encode(),
            f"{folder}adapter_model.safetensors": safetensors_bytes(tensors_for())}


@pytest.fixture
def tiny(db, tmp_path):
    """The tiny model's base model row (its config.json on disk, as the weights folder has it) and a dev pool serving
    LoRA up to rank 8, without backends (the deployment waits for one)."""
    folder = tmp_path / "tiny-chat"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 512}))
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(folder),
                                    context_length=1024)
    pool = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev", max_lora_rank=8)
    return base, pool


def _key_client(tenant, user, scopes=("finetune",)) -> APIClient:
    _, secret = tenant_services.api_key_create(tenant=tenant, name="byo", scopes=list(scopes), actor=Actor(user=user))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def v1(world):
    return _key_client(world.tenant, world.owner)


def post_v1(client, files, **fields):
    return client.post("/v1/adapters", {"file": files, **fields}, format="multipart")


def assert_refused(response, status: int, code: str, *needles: str) -> str:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    for needle in needles:
        assert needle in body["error"]["message"], body
    return body["error"]["message"]


def _nothing_kept(settings, tenant) -> None:
    root = Path(settings.STORAGE_DIR) / "tenants" / str(tenant.pk) / "adapters"
    assert not root.exists() or list(root.iterdir()) == []
    assert not Adapter.objects.for_tenant(tenant).exists()


# ---- accepted ------------------------------------------------------------------------------------------------------


def test_two_files_become_the_tenants_adapter_and_are_deployed_like_a_trained_one(world, tiny, v1, settings):
    base, pool = tiny
    response = post_v1(v1, two_files(), model="tiny-chat", suffix="mine")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"].startswith("ft:tiny-chat:acme:mine:") and body["object"] == "adapter"
    assert (body["source"], body["rank"], body["alpha"], body["base_model"]) == ("uploaded", 4, 8, "tiny-chat")
    assert body["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert body["parameters"] == 2 * 4 * ((176 + 64) + (64 + 64) + (64 + 64))  # layers × r × Σ(d_in + d_out)
    # Deployed to the pool, as finetune.deploy deploys a trained adapter (no backend yet: it waits for one).
    assert body["deployments"] == [{"pool": "shared-tiny", "state": "pending",
                                    "error": "The pool has no enabled backends yet; it loads when one is added."}]
    adapter = Adapter.objects.for_tenant(world.tenant).get(name=body["id"])
    folder = Path(adapter.path)
    assert folder.parent == Path(settings.STORAGE_DIR).resolve() / "tenants" / str(world.tenant.pk) / "adapters"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert adapter.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="finetune.adapter_uploaded").count() == 1
    assert AdapterDeployment.objects.for_tenant(world.tenant).get(adapter=adapter).pool == pool


def test_an_uploaded_adapter_is_copied_to_the_tenants_hub_repository_when_the_hub_is_configured(
        world, tiny, v1, settings, monkeypatch, django_capture_on_commit_callbacks):
    from finetune import tasks

    sent = []
    monkeypatch.setattr(tasks.push_adapter_to_hub, "delay", lambda *args: sent.append(args))
    with django_capture_on_commit_callbacks(execute=True):
        assert post_v1(v1, two_files(), model="tiny-chat", suffix="off").status_code == 201
    assert sent == []  # no Hub configured: nothing is sent
    settings.PLATFORM_HF_HUB_TOKEN, settings.PLATFORM_HF_HUB_NAMESPACE = "hf_x", "platform-org"
    with django_capture_on_commit_callbacks(execute=True):
        response = post_v1(v1, two_files(), model="tiny-chat", suffix="on")
    assert response.status_code == 201, response.content
    adapter = Adapter.objects.for_tenant(world.tenant).get(name=response.json()["id"])
    assert sent == [(adapter.pk, world.tenant.pk)]  # the task trained adapters get (test_hub.py: what it uploads)


@pytest.mark.parametrize("archive", [
    lambda: zip_of({**valid_members("my-adapter/"), "my-adapter/README.md": b"# peft's model card", "my-adapter/": b""}),
    lambda: tar_of({**valid_members("./"), "./README.md": b"# model card"}),
    lambda: zip_of(valid_members(), name="whatever.bin.zip"),
], ids=["zip-in-a-folder-with-readme", "tar.gz", "zip"])
def test_one_archive_holding_the_two_files_is_accepted(world, tiny, v1, archive):
    response = post_v1(v1, [archive()], deploy="false")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["deployments"] == [] and "not asked to deploy" in body["not_deployed"]
    assert sorted(p.name for p in Path(Adapter.objects.for_tenant(world.tenant).get().path).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # README.md skipped


def test_the_base_model_comes_from_the_config_when_model_is_left_out(world, tiny, v1):
    config = lora_config(base_model_name_or_path="/home/me/models/tiny-chat", target_modules="all-linear", r=2)
    weights = safetensors_bytes(tensors_for(rank=2, targets=tuple(DIMS)), dtype="float16")
    response = post_v1(v1, two_files(config, weights))
    assert response.status_code == 201, response.content
    assert response.json()["base_model"] == "tiny-chat" and len(response.json()["target_modules"]) == 7


def test_v1_lists_only_the_keys_tenants_adapters(world, tiny, v1):
    assert post_v1(v1, two_files()).status_code == 201
    names = [a["id"] for a in v1.get("/v1/adapters").json()["data"]]
    assert len(names) == 1 and names[0].startswith("ft:tiny-chat:acme:")
    assert _key_client(world.other_tenant, world.outsider).get("/v1/adapters").json()["data"] == []


# ---- refused, with the reason --------------------------------------------------------------------------------------


def test_a_wrong_shape_is_refused_naming_the_tensor_expected_and_got(world, tiny, v1, settings):
    shapes = tensors_for()
    shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] = (4, 64)  # d_in of down_proj is 176
    message = assert_refused(post_v1(v1, two_files(weights=safetensors_bytes(shapes))), 400, "tensor_shape_mismatch",
                             "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight has shape [4, 64], "
                             "expected [4, 176]")
    assert "layers.0" not in message  # only the wrong tensor is named
    _nothing_kept(settings, world.tenant)


def test_a_rank_above_what_the_pool_serves_is_refused(world, tiny, v1, settings):
    weights = safetensors_bytes(tensors_for(rank=16))
    assert_refused(post_v1(v1, two_files(lora_config(r=16, lora_alpha=32), weights)), 400, "rank_not_served",
                   "rank 16 is above the highest LoRA rank your pool for tiny-chat serves (8)")
    _nothing_kept(settings, world.tenant)


def test_a_base_model_no_pool_serves_is_refused(world, tiny, v1):
    BackendPool.objects.all().delete()
    assert_refused(post_v1(v1, two_files()), 409, "rank_not_served", "no pool serves tiny-chat")


def test_pickled_weights_are_refused_as_files_in_archives_and_under_the_safetensors_name(world, tiny, v1, settings):
    config = json.dumps(lora_config()).encode()
    pickle = b"\x80\x04\x95" + b"\x00" * 64  # what pickle.dumps starts with
    assert_refused(post_v1(v1, [SimpleUploadedFile("adapter_config.json", config),
                                SimpleUploadedFile("adapter_model.bin", pickle)]), 400, "pickle_refused",
                   "'adapter_model.bin' is a pickled file")
    assert_refused(post_v1(v1, [zip_of({"adapter_config.json": config, "adapter_model.bin": pickle})]), 400,
                   "pickle_refused", "'adapter_model.bin' is a pickled file")
    assert_refused(post_v1(v1, [tar_of({"a/adapter_config.json": config, "a/optimizer.pt": pickle})]), 400,
                   "pickle_refused", "'a/optimizer.pt'")
    torch_save = zip_of({"archive/data.pkl": pickle}).read()  # torch.save's format: a zip of pickles
    for disguised in (pickle, torch_save):
        assert_refused(post_v1(v1, two_files(weights=disguised)), 400, "pickle_refused", "PyTorch pickle")
    _nothing_kept(settings, world.tenant)


@pytest.mark.parametrize("archive,reason", [
    (lambda: zip_of({"../adapter_config.json": b"{}", "adapter_model.safetensors": b""}), "climbs out of the archive"),
    (lambda: zip_of({"/etc/adapter_config.json": b"{}"}), "absolute"),
    (lambda: tar_of({"a/../../adapter_model.safetensors": b""}), "climbs out of the archive"),
    (lambda: tar_of({}, links={"adapter_model.safetensors": "/etc/passwd"}), "is a link"),
], ids=["zip-dotdot", "zip-absolute", "tar-dotdot", "tar-symlink"])
def test_an_archive_that_climbs_out_or_links_is_refused(world, tiny, v1, settings, archive, reason):
    assert_refused(post_v1(v1, [archive()]), 400, "unsafe_archive", reason)
    _nothing_kept(settings, world.tenant)


def test_any_other_file_in_an_archive_is_refused(world, tiny, v1):
    assert_refused(post_v1(v1, [zip_of({**valid_members(), "tokenizer.json": b"{}"})]), 400, "unexpected_file",
                   "'tokenizer.json'")
    assert_refused(post_v1(v1, [zip_of({"adapter_config.json": b"{}"})]), 400, "missing_file",
                   "adapter_model.safetensors is missing")
    assert_refused(post_v1(v1, [SimpleUploadedFile("adapter_model.safetensors", safetensors_bytes(tensors_for()))]),
                   400, "invalid_archive", "neither a .zip nor a .tar")


def test_an_upload_over_the_size_limit_is_refused(world, tiny, v1, settings):
    settings.FINETUNE_MAX_ADAPTER_BYTES = 4096  # the adapter's weights are 15,872 bytes
    assert_refused(post_v1(v1, two_files()), 413, "adapter_too_large", "4,096 bytes")
    # An archive whose files are small once packed is counted by what it holds, before a byte is inflated.
    packed = zip_of({"adapter_config.json": json.dumps(lora_config()).encode(),
                     "adapter_model.safetensors": b"\x00" * 100_000}, compression=zipfile.ZIP_DEFLATED)
    assert len(packed.read()) < 4096
    packed.seek(0)
    assert_refused(post_v1(v1, [packed]), 413, "adapter_too_large")
    _nothing_kept(settings, world.tenant)


def test_the_request_body_limit_of_the_upload_paths_is_the_adapter_limit(settings):
    from portal.security import MULTIPART_SLACK, body_limit

    for path in ("/v1/adapters", "/api/tenants/acme/adapters/upload/", "/t/acme/finetune/adapters/upload/"):
        assert body_limit(path) == settings.FINETUNE_MAX_ADAPTER_BYTES + MULTIPART_SLACK
    assert body_limit("/v1/fine_tuning/jobs") == settings.DATA_UPLOAD_MAX_MEMORY_SIZE + MULTIPART_SLACK


def test_a_wrong_base_model_is_refused(world, tiny, v1):
    assert_refused(post_v1(v1, two_files(lora_config(base_model_name_or_path="meta-llama/Llama-3.1-8B")), model="tiny-chat"),
                   400, "base_model_mismatch", "trained on 'meta-llama/Llama-3.1-8B', not on tiny-chat")
    assert_refused(post_v1(v1, two_files(lora_config(base_model_name_or_path="meta-llama/Llama-3.1-8B"))), 400,
                   "base_model_mismatch", "none of your base models (tiny-chat)")
    assert_refused(post_v1(v1, two_files(), model="llama-70b"), 404, "model_not_found")


def test_a_base_model_the_tenant_may_not_use_is_not_found(world, tiny, v1):
    from serving.models import ModelConfig

    BaseModel.objects.create(name="other", hf_id="org/other", hidden_size=64, num_layers=2, num_attention_heads=2,
                             intermediate_size=176)
    ModelConfig.objects.for_tenant(world.tenant).update_or_create(tenant=world.tenant, defaults={"allowed_models": ["other"]})
    assert_refused(post_v1(v1, two_files(), model="tiny-chat"), 404, "model_not_found")


@pytest.mark.parametrize("overrides,needle", [
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"target_modules": ["c_attn"]}, "['c_attn'] are not linear layers"),
    ({"target_modules": ".*proj"}, "a regular expression is not served"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"bias": "all"}, "bias"),
    ({"r": 0}, "positive integer"),
], ids=["ia3", "module", "regex", "dora", "modules-to-save", "rank-pattern", "bias", "rank-zero"])
def test_a_config_that_is_not_a_plain_lora_of_known_modules_is_refused(world, tiny, v1, overrides, needle):
    assert_refused(post_v1(v1, two_files(lora_config(**overrides))), 400, "invalid_adapter_config", needle)


def test_missing_and_unexpected_tensors_and_dtypes_are_refused_one_by_one(world, tiny, v1):
    shapes = tensors_for()
    del shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = (4, 64)  # k_proj is not a target
    message = assert_refused(post_v1(v1, two_files(weights=safetensors_bytes(shapes))), 400, "missing_tensor")
    assert "layers.1.self_attn.q_proj.lora_B.weight is missing (expected shape [64, 4])" in message
    assert "layers.0.self_attn.k_proj.lora_A.weight is not part of a LoRA of the declared target modules" in message
    assert_refused(post_v1(v1, two_files(weights=safetensors_bytes(tensors_for(), dtype="float64"))), 400,
                   "dtype_not_allowed", "is F64; allowed dtypes are F16, BF16, F32")


def test_a_safetensors_header_that_lies_is_refused(world, tiny, v1):
    good = safetensors_bytes(tensors_for())
    assert_refused(post_v1(v1, two_files(weights=good[:-4])), 400, "invalid_safetensors", "after its header")
    huge = (10 ** 9).to_bytes(8, "little") + good[8:]
    assert_refused(post_v1(v1, two_files(weights=huge)), 400, "invalid_safetensors", "header claims")


def test_checking_an_upload_imports_no_torch(tmp_path):
    """The web request reads the safetensors header itself: checking an adapter loads neither torch nor safetensors."""
    import os
    import subprocess
    import sys

    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(safetensors_bytes(tensors_for()))
    code = ("import sys, django; django.setup()\n"
            "import finetune.byo_api, finetune.byo_views\n"
            "from pathlib import Path\n"
            "from finetune import byo\n"
            f"tensors = byo.read_safetensors_header(Path({str(weights)!r}), max_header_bytes=1 << 20)\n"
            "assert len(tensors) == 12\n"
            "print(sorted(m for m in ('torch', 'safetensors', 'transformers', 'peft', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- who may upload ------------------------------------------------------------------------------------------------


def test_management_api_upload_is_for_admins_of_the_tenant(world, tiny):
    def post(user):
        client = APIClient()
        client.force_login(user)
        return client.post("/api/tenants/acme/adapters/upload/", {"file": two_files()}, format="multipart")

    assert post(world.outsider).status_code == 404
    assert post(world.viewer).status_code == 403
    assert post(world.developer).status_code == 403
    assert not Adapter.objects.for_tenant(world.tenant).exists()
    response = post(world.admin)
    assert response.status_code == 201 and response.json()["source"] == "uploaded"
    client = APIClient()
    client.force_login(world.viewer)
    assert [(a["name"], a["source"]) for a in client.get("/api/tenants/acme/adapters/").json()] == [
        (response.json()["id"], "uploaded")]  # the management API's list says which adapters were uploaded


def test_management_api_refusal_lists_every_problem(world, tiny):
    client = APIClient()
    client.force_login(world.admin)
    shapes = {name: (shape[1], shape[0]) for name, shape in tensors_for().items()}  # every tensor transposed
    response = client.post("/api/tenants/acme/adapters/upload/",
                           {"file": two_files(weights=safetensors_bytes(shapes))}, format="multipart")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "tensor_shape_mismatch" and len(body["problems"]) == 12
    assert "lora_A.weight has shape [176, 4], expected [4, 176]" in body["problems"][0]


def test_a_management_read_key_cannot_upload(world, tiny):
    client = _key_client(world.tenant, world.owner, scopes=("management:read",))
    assert client.post("/api/tenants/acme/adapters/upload/", {"file": two_files()}, format="multipart").status_code == 403
    writer = _key_client(world.tenant, world.owner, scopes=("management:write",))
    assert writer.post("/api/tenants/acme/adapters/upload/", {"file": two_files()}, format="multipart").status_code == 201


def test_v1_upload_needs_the_finetune_scope(world, tiny):
    client = _key_client(world.tenant, world.owner, scopes=("inference",))
    assert_refused(post_v1(client, two_files()), 403, "insufficient_scope")


def test_console_upload_page(world, tiny, client):
    client.force_login(world.developer)
    assert client.get("/t/acme/finetune/adapters/upload/").status_code == 403
    client.force_login(world.outsider)
    assert client.get("/t/acme/finetune/adapters/upload/").status_code == 404
    client.force_login(world.admin)
    page = client.get("/t/acme/finetune/adapters/upload/")
    assert page.status_code == 200 and b'name="file" multiple' in page.content
    shapes = tensors_for()
    shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = (32, 4)
    refused = client.post("/t/acme/finetune/adapters/upload/", {"file": two_files(weights=safetensors_bytes(shapes)),
                                                                 "model": "tiny-chat"})
    assert refused.status_code == 400
    assert b"layers.0.self_attn.q_proj.lora_B.weight has shape [32, 4], expected [64, 4]" in refused.content
    accepted = client.post("/t/acme/finetune/adapters/upload/", {"file": two_files(), "model": "tiny-chat",
                                                                  "deploy": "on"})
    assert accepted.status_code == 302 and accepted["Location"] == "/t/acme/finetune/adapters/"
    listing = client.get("/t/acme/finetune/adapters/")
    assert b"uploaded</span>" in listing.content and b"shared-tiny: Pending" in listing.content


# ---- a real peft adapter serves through the gateway ----------------------------------------------------------------


def _peft_adapter(tiny_model_path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      task_type="CAUSAL_LM", init_lora_weights=False))  # random B: it changes answers
    model.peft_config["default"].base_model_name_or_path = "platform/tiny-chat"
    model.save_pretrained(out)
    return out


@pytest.fixture
def dev_backend(tiny_model_path):
    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread

    url, stop = run_in_thread(BackendConfig(model=str(tiny_model_path), port=0, flavor="dev"))
    yield url
    stop()


@pytest.mark.slow
def test_a_peft_adapter_saved_by_peft_is_accepted_deployed_and_answers_through_the_gateway(
        transactional_db, world, tiny_model_path, dev_backend, tmp_path, settings):
    from openai import NotFoundError, OpenAI

    from serving.gateway.app import GatewayApp
    from serving.gateway.settings import GatewaySettings
    from serving.models import Backend
    from tests.support.gateway import GatewayServer

    settings.STORAGE_DIR = tmp_path / "storage"
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024)
    pool = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev")
    backend = Backend.objects.create(pool=pool, url=dev_backend)
    saved = _peft_adapter(tiny_model_path, tmp_path / "mine")
    assert (saved / "README.md").exists()  # peft's model card rides along in the archive and is skipped
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(saved, arcname="mine")  # what `tar czf mine.tgz mine/` makes
    _, secret = tenant_services.api_key_create(tenant=world.tenant, name="sdk", scopes=["finetune", "inference"],
                                               actor=Actor(user=world.owner))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    response = post_v1(client, [SimpleUploadedFile("mine.tgz", buffer.getvalue())])
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["deployments"] == [{"pool": "shared-tiny", "state": "active", "error": ""}] and body["rank"] == 8
    backend.refresh_from_db()
    assert backend.loaded_adapters == [body["id"]]

    messages = [{"role": "user", "content": "the cat sees a book"}]
    direct = OpenAI(base_url=f"{dev_backend}/v1", api_key="unused", max_retries=0)
    expected = direct.chat.completions.create(model=body["id"], messages=messages, max_tokens=12, temperature=0)
    plain = direct.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    assert expected.choices[0].message.content != plain.choices[0].message.content  # the adapter is applied

    _, foreign = tenant_services.api_key_create(tenant=world.other_tenant, name="g", scopes=["inference"],
                                                actor=Actor(user=world.outsider))
    server = GatewayServer(GatewayApp(settings=GatewaySettings(health_interval_s=0.2, config_poll_s=0.1,
                                                              connect_timeout_s=1.0, read_timeout_s=30))).start()
    try:
        answer = OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0).chat.completions.create(
            model=body["id"], messages=messages, max_tokens=12, temperature=0)
        assert answer.choices[0].message.content == expected.choices[0].message.content
        with pytest.raises(NotFoundError):  # another tenant's uploaded adapter does not exist for it
            OpenAI(base_url=f"{server.url}/v1", api_key=foreign, max_retries=0).chat.completions.create(
                model=body["id"], messages=messages, max_tokens=4)
    finally:
        server.stop()

    admin = APIClient()
    admin.force_login(world.admin)
    adapter = Adapter.objects.for_tenant(world.tenant).get(name=body["id"])
    assert admin.post(f"/api/tenants/acme/adapters/{adapter.pk}/undeploy/").json()["undeployed_from"] == ["shared-tiny"]
    backend.refresh_from_db()
    assert backend.loaded_adapters == []


def test_a_storage_failure_is_a_503_and_keeps_nothing(world, tiny, v1, settings, monkeypatch):
    def full_disk(parts, folder):
        (folder / "adapter_config.json").write_bytes(b"{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(byo, "receive_upload", full_disk)
    assert_refused(post_v1(v1, two_files()), 503, "storage_error", "No space left on device")
    _nothing_kept(settings, world.tenant)
