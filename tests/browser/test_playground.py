"""The Playground in a browser (issue 14, item 8), streaming for real: the console served under ASGI as deployed
(`portal.asgi`: Django and the gateway in one app, under uvicorn in a thread) with a simulated dev backend behind the
gateway. A conversation with two models side by side (the base model and the tenant's adapter), the sampling
parameters, a system prompt typed for the try, and "View code" for exactly what was sent.

Django's `live_server` cannot serve this: it has no gateway, so /v1 answers 404 there.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from serving.models import UsageRecord
from tenants import services
from tests.support.browser import sign_in
from tests.support.live_console import console_with_gateway, desktop_page
from tests.support.gateway import (ADAPTER_A, deploy_adapter, dev_stats, make_base_model, make_pool,
                                   set_model_config, sim_backend, wait_for)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]
expect = pytest.importorskip("playwright.sync_api", reason="browser tests need the 'playwright' package").expect


@pytest.fixture
def served(request, world):
    """tiny-chat on a simulated backend that also serves acme's adapter; acme's live system prompt. Instant tokens,
    unless parametrized (indirect) with the backend's settings."""
    url, stop = sim_backend(**{"lora_adapters": {ADAPTER_A: "/unused"}, "sim_output_tokens": 6, **getattr(request, "param", {})})
    base = make_base_model()
    pool = make_pool("shared", base, [url], adapters=[ADAPTER_A])
    deploy_adapter(world.tenant, ADAPTER_A, base, pool)
    set_model_config(world.tenant, default_model="tiny-chat")
    services.system_prompt_save(tenant=world.tenant, text="Live: be brief.", note="", actor=services.Actor(user=world.owner))
    yield url
    stop()


@pytest.fixture
def asgi_console(transactional_db, settings, monkeypatch, served):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    with console_with_gateway(settings, monkeypatch) as server:
        yield server


@pytest.fixture
def page(browser, asgi_console):
    with desktop_page(browser, asgi_console.url) as page:
        yield page


def chat_requests(page) -> list:
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    return sent


def answers(page, side: str) -> list[str]:
    return page.locator(f"#pg-transcript-{side} .pg-assistant .pg-text").all_inner_texts()


def test_two_models_side_by_side_in_a_conversation_with_parameters_and_code(page, world, served):
    sign_in(page, world.developer.email)
    page.goto("/t/acme/playground/")
    sent = chat_requests(page)
    page.get_by_label("Compare two models side by side").check()
    expect(page.get_by_label("Second model")).to_have_value(ADAPTER_A)  # base vs adapter, by default
    expect(page.locator("#pg-title-a")).to_have_text("tiny-chat")
    expect(page.locator("#pg-title-b")).to_have_text(ADAPTER_A)
    page.get_by_label("temperature").fill("0.3")
    page.get_by_label("top_p").fill("0.9")
    page.get_by_label("max_tokens").fill("5")
    page.get_by_label("stop", exact=True).fill("STOP-HERE\n###")
    page.get_by_label("Your message").fill("Hi there")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("Both answers are in.")
    for side in "ab":
        expect(page.locator(f"#pg-status-{side}")).to_contain_text("output tokens")
    first = {side: answers(page, side) for side in "ab"}
    assert all(len(first[s]) == 1 and first[s][0].strip() for s in "ab"), first  # streamed text in both columns

    # The second turn, sent from the keyboard: each column sends its whole conversation, its own answer included.
    page.get_by_label("Your message").fill("And then?")
    page.get_by_label("Your message").press("Control+Enter")
    expect(page.locator("#pg-transcript-a .pg-msg")).to_have_count(4)
    expect(page.locator("#pg-transcript-b .pg-msg")).to_have_count(4)
    expect(page.locator("#pg-status")).to_have_text("Both answers are in.")
    assert len(sent) == 4
    bodies = [r.post_data_json for r in sent]
    assert sorted(b["model"] for b in bodies) == sorted(["tiny-chat", ADAPTER_A] * 2)
    for body in bodies:
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"], body["stream"]) == (0.3, 0.9, 5, ["STOP-HERE", "###"], True)
        assert sent[0].headers["authorization"].startswith("Bearer pgt_")  # the page's signed playground token
    for side, model in (("a", "tiny-chat"), ("b", ADAPTER_A)):
        second = [b for b in bodies if b["model"] == model][1]
        assert second["messages"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first[side][0]},
                                      {"role": "user", "content": "And then?"}]
    # Both were served through the gateway and metered as the playground's (no API key).
    rows = wait_for(lambda: (lambda r: r if len(r) == 4 else None)(list(UsageRecord.objects.for_tenant(world.tenant))))
    assert sorted(r.model for r in rows) == sorted(["tiny-chat", ADAPTER_A] * 2) and all(r.api_key_id is None for r in rows)
    assert dev_stats(served)["adapter_requests"].get(ADAPTER_A) == 2

    # View code: curl and Python for exactly the two requests just sent; the key is $API_KEY, never the page's token.
    page.get_by_role("button", name="View code").click()
    expect(page.get_by_role("button", name="Hide code")).to_have_attribute("aria-expanded", "true")
    last = {b["model"]: b for b in bodies[2:]}
    for model, body in last.items():
        curl = page.locator(f'#pg-code-body [data-model="{model}"] pre[data-code="curl"]').inner_text()
        assert curl.startswith(f"curl {asgi_url(page)}/v1/chat/completions")
        assert '-H "Authorization: Bearer $API_KEY"' in curl
        assert json.loads(re.search(r"-d '(.*)'\s*$", curl, re.S).group(1)) == body
        python = page.locator(f'#pg-code-body [data-model="{model}"] pre[data-code="python"]').inner_text()
        assert f'OpenAI(base_url="{asgi_url(page)}/v1", api_key=os.environ["API_KEY"])' in python
        assert f'model="{model}",' in python and "temperature=0.3," in python and 'stop=[\n        "STOP-HERE",\n        "###",\n    ],' in python
        assert '        {"role": "user", "content": "And then?"},\n    ],' in python and 'stream_options={"include_usage": True},' in python
        call = next(n for n in ast.walk(ast.parse(python)) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "create")
        assert {k.arg: ast.literal_eval(k.value) for k in call.keywords} == body  # valid Python, exactly what was sent
    assert "pgt_" not in page.locator("#pg-code-body").inner_text()
    page.screenshot(path="/tmp/console-playground.png", full_page=True)  # described in docs/console.md


def asgi_url(page) -> str:
    return re.match(r"https?://[^/]+", page.url).group(0)


def test_a_system_prompt_typed_for_the_try_by_an_admin_reaches_the_model_and_changes_nothing_live(page, world, served):
    sign_in(page, world.admin.email)
    page.goto("/t/acme/playground/")
    sent = chat_requests(page)
    page.get_by_text("System prompt for this try").click()
    expect(page.get_by_label(re.compile("^System prompt \\(applies"))).to_have_value("Live: be brief.")
    page.get_by_label(re.compile("^System prompt \\(applies")).fill("Answer like a pirate.")
    page.get_by_label("Your message").fill("Ahoy")
    page.get_by_role("button", name="Send").click()  # applies the typed prompt first, then sends
    expect(page.locator("#pg-status")).to_have_text("Answer is in.")
    expect(page.locator("#pg-system-state")).to_have_text("edited (for this try)")
    expect(page.locator("#pg-status-a")).to_contain_text("input tokens (system prompt included) ·")
    last = dev_stats(served)["last_request"]["body"]
    assert last["messages"][0] == {"role": "system", "content": "Answer like a pirate."}  # in place of the live one
    token = services.playground_token_read(sent[0].headers["authorization"].removeprefix("Bearer "))
    assert (token.tenant_id, token.user_id, token.system_prompt) == (world.tenant.pk, world.admin.pk, "Answer like a pirate.")
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.text == "Live: be brief."
    page.get_by_role("button", name="View code").click()
    expect(page.locator("#pg-code-body")).to_contain_text("the system prompt typed here (for this try)")

    # Back to the live prompt: the next request gets it again.
    page.get_by_role("button", name="Back to the live prompt").click()
    expect(page.locator("#pg-system-status")).to_have_text("Requests from this page use the live system prompt again.")
    expect(page.get_by_label(re.compile("^System prompt \\(applies"))).to_have_value("Live: be brief.")
    page.get_by_role("button", name="New conversation").click()
    page.get_by_label("Your message").fill("Again")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("Answer is in.")
    assert dev_stats(served)["last_request"]["body"]["messages"][0] == {"role": "system", "content": "Live: be brief."}
    assert sent[-1].post_data_json["messages"] == [{"role": "user", "content": "Again"}]  # a new conversation

    # No system prompt for the try: the token count does not claim one is included.
    page.get_by_label(re.compile("^System prompt \\(applies")).fill("")
    page.get_by_role("button", name="Use this prompt for the try").click()
    expect(page.locator("#pg-system-state")).to_have_text("none (for this try)")
    page.get_by_role("button", name="New conversation").click()
    page.get_by_label("Your message").fill("Plain")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("Answer is in.")
    expect(page.locator("#pg-status-a")).to_contain_text("input tokens ·")
    expect(page.locator("#pg-status-a")).not_to_contain_text("system prompt included")


def test_the_playground_comparing_two_models_has_no_serious_accessibility_violations_and_stacks_on_a_phone(page, world, served):
    axe_sync = pytest.importorskip("axe_playwright_python.sync_playwright", reason="needs the 'axe-playwright-python' package")
    page.emulate_media(reduced_motion="reduce")  # no colour transitions: axe reads the colours the scheme settles on
    sign_in(page, world.developer.email)
    page.goto("/t/acme/playground/")
    page.get_by_label("Compare two models side by side").check()
    page.get_by_label("Your message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("Both answers are in.")
    page.get_by_text("System prompt for this try").click()
    page.get_by_role("button", name="View code").click()
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme, reduced_motion="reduce")
        violations = [v for v in axe_sync.Axe().run(page).response["violations"] if v["impact"] in {"serious", "critical"}]
        assert violations == [], (scheme, [(v["id"], [n["target"] for n in v["nodes"][:3]]) for v in violations])

    # At phone width the two columns stack, and nothing scrolls sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    a, b = page.locator("#pg-transcript-a").bounding_box(), page.locator("#pg-transcript-b").bounding_box()
    assert b["y"] >= a["y"] + a["height"] and b["x"] == a["x"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_a_refused_token_is_renewed_and_a_refusal_shows_in_its_column_without_joining_the_conversation(page, world, served):
    sign_in(page, world.developer.email)
    page.goto("/t/acme/playground/")
    sent = chat_requests(page)
    page.locator("#playground").evaluate("form => { form.dataset.token = 'pgt_past-its-hour'; }")
    page.get_by_label("Your message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("Answer is in.")
    assert [r.headers["authorization"] for r in sent][0] == "Bearer pgt_past-its-hour"  # refused with 401 …
    renewed = services.playground_token_read(sent[1].headers["authorization"].removeprefix("Bearer "))
    assert (renewed.tenant_id, renewed.user_id, renewed.system_prompt) == (world.tenant.pk, world.developer.pk, None)  # … renewed
    first = answers(page, "a")
    assert len(first) == 1 and first[0].strip()

    # Parameters are checked before anything is sent.
    page.get_by_label("Your message").fill("Refused")
    page.get_by_label("top_p").fill("1.5")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("top_p must be from 0 to 1.")
    expect(page.get_by_label("top_p")).to_be_focused()
    assert len(sent) == 2
    page.get_by_label("top_p").fill("")

    # The gateway's refusal is shown in the column; the message it refused is not kept in the conversation.
    expect(page.get_by_label("Your message")).to_have_value("Refused")  # kept, to send once corrected
    page.locator("#pg-model option").first.evaluate("option => { option.value = 'no-such-model'; }")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status-a")).to_contain_text("Error: The model `no-such-model` does not exist")
    expect(page.locator("#pg-status")).to_have_text("No answer: see the model's column.")
    expect(page.locator("#pg-transcript-a .pg-msg")).to_have_count(3)  # Hi, its answer, and the refused message
    expect(page.locator("#pg-transcript-a .pg-user .pg-who").last).to_have_text("You (not kept: no answer)")
    page.locator("#pg-model option").first.evaluate("option => { option.value = 'tiny-chat'; }")
    page.get_by_label("Your message").fill("Again")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("Answer is in.")
    assert sent[-1].post_data_json["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first[0]},
                                                   {"role": "user", "content": "Again"}]


def test_a_developer_tries_a_saved_draft_whose_token_is_renewed_for_that_draft(page, world, served):
    services.system_prompt_save(tenant=world.tenant, text="Draft: be kind.", note="", actor=services.Actor(user=world.owner), activate=False)
    sign_in(page, world.developer.email)
    page.goto("/t/acme/playground/?prompt=2")
    sent = chat_requests(page)
    expect(page.locator("#pg-system")).to_have_attribute("open", "")  # open when trying a version
    box = page.get_by_label(re.compile("^System prompt \\(applies"))
    expect(box).to_have_value("Draft: be kind.")
    expect(box).to_have_attribute("readonly", "")  # a developer tries saved versions, types none
    expect(page.get_by_role("button", name="Use this prompt for the try")).to_have_count(0)
    page.locator("#playground").evaluate("form => { form.dataset.token = 'pgt_past-its-hour'; }")
    page.get_by_label("Your message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text("Answer is in.")
    renewed = services.playground_token_read(sent[1].headers["authorization"].removeprefix("Bearer "))
    assert renewed.system_prompt == "Draft: be kind."  # the draft still, not the live prompt
    assert dev_stats(served)["last_request"]["body"]["messages"][0] == {"role": "system", "content": "Draft: be kind."}
    page.get_by_role("button", name="Back to the live prompt").click()
    expect(page.locator(".banner[data-trying]")).to_be_hidden()
    expect(box).to_have_value("Live: be brief.")


@pytest.mark.parametrize("served", [{"sim_tokens_per_second": 4, "sim_output_tokens": 200}], indirect=True)
def test_stop_keeps_what_came_and_new_conversation_mid_stream_keeps_nothing(page, world, served):
    sign_in(page, world.developer.email)
    page.goto("/t/acme/playground/")
    sent = chat_requests(page)
    page.get_by_label("max_tokens").fill("200")
    page.get_by_label("Your message").fill("Tell me a long story")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status-a")).to_have_text("Streaming…")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#pg-status-a")).to_have_text("Stopped.")
    partial = answers(page, "a")[0]
    assert partial.strip()

    page.get_by_label("Your message").fill("Go on")
    page.get_by_role("button", name="Send").click()
    assert sent[-1].post_data_json["messages"] == [{"role": "user", "content": "Tell me a long story"},
                                                   {"role": "assistant", "content": partial}, {"role": "user", "content": "Go on"}]
    expect(page.locator("#pg-status-a")).to_have_text("Streaming…")
    page.get_by_role("button", name="New conversation").click()  # while the answer streams
    expect(page.locator("#pg-status")).to_have_text("New conversation.")
    expect(page.locator("#pg-transcript-a .pg-msg")).to_have_count(0)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    page.get_by_label("Your message").fill("Fresh start")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status-a")).to_have_text("Streaming…")
    assert sent[-1].post_data_json["messages"] == [{"role": "user", "content": "Fresh start"}]  # nothing of the cleared one
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#pg-status")).to_have_text("Stopped.")
