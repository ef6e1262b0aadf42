// The console's Playground: a conversation with one model, or the same conversation with two side by side, streamed
// from the gateway (SSE over fetch) with the page's short-lived signed token; the sampling parameters; a system prompt
// for the try (a new token from the console carries it); and the curl / Python code for exactly what was sent.
(function () {
  "use strict";
  const form = document.getElementById("playground");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const message = $("pg-message"), send = $("pg-send"), stop = $("pg-stop"), clear = $("pg-clear"), status = $("pg-status");
  const compare = $("pg-compare"), systemText = $("pg-system-text"), systemStatus = $("pg-system-status");
  const codeToggle = $("pg-code-toggle"), codeBody = $("pg-code-body");
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  const endpoint = new URL(form.dataset.endpoint, window.location.origin).href;

  // form.dataset.token: the page's signed playground token (an hour long; renewed from the console when refused).
  let appliedPrompt = systemText.value;  // the system prompt the current token gives the page's requests
  // What the token carries: a saved version (?prompt=N), the text typed here, or nothing (the live prompt).
  let carries = form.dataset.trying ? {prompt: form.dataset.trying} : null;
  let promptLabel = form.dataset.trying ? "system prompt v" + form.dataset.trying + " (being tried)" : "the live system prompt";
  let controllers = [];
  let lastSent = null;  // [{model, body}] of the last send, one per column

  const sides = {
    a: {select: $("pg-model"), title: $("pg-title-a"), log: $("pg-transcript-a"), status: $("pg-status-a"), history: []},
    b: {select: $("pg-model-b"), title: $("pg-title-b"), log: $("pg-transcript-b"), status: $("pg-status-b"), history: []},
  };
  const active = () => (compare.checked ? ["a", "b"] : ["a"]);

  // ---- layout: one column or two ----
  function layout() {
    const two = compare.checked;
    $("pg-model-b-field").hidden = !two;
    document.querySelector('.pg-col[data-side="b"]').hidden = !two;
    $("pg-cols").classList.toggle("pg-two", two);
    for (const side of Object.values(sides)) side.title.textContent = side.select.value;
  }
  compare.addEventListener("change", layout);
  sides.a.select.addEventListener("change", layout);
  sides.b.select.addEventListener("change", layout);
  layout();

  // ---- transcript ----
  function bubble(side, role, text) {
    const item = document.createElement("div");
    item.className = "pg-msg pg-" + role;
    const who = document.createElement("span");
    who.className = "pg-who";
    who.textContent = role === "user" ? "You" : sides[side].select.value;
    const body = document.createElement("div");
    body.className = "pg-text";
    body.textContent = text;
    item.append(who, body);
    sides[side].log.append(item);
    return body;
  }

  let generation = 0;  // bumped by New conversation: answers still arriving then belong to no conversation
  clear.addEventListener("click", function () {
    generation += 1;
    for (const controller of controllers) controller.abort();
    for (const side of Object.values(sides)) { side.history = []; side.log.textContent = ""; side.status.textContent = ""; }
    status.textContent = "New conversation.";
    message.focus();
  });

  // ---- parameters ----
  function number(id, name, lo, hi, integer) {
    const field = $(id), raw = field.value.trim();
    if (raw === "") return undefined;
    const value = Number(raw);
    if (!Number.isFinite(value) || value < lo || value > hi || (integer && !Number.isInteger(value))) {
      field.focus();
      throw new Error(name + " must be " + (integer ? "a whole number " : "") + "from " + lo + " to " + hi + ".");
    }
    return value;
  }

  function parameters() {
    const params = {};
    const temperature = number("pg-temperature", "temperature", 0, Number($("pg-temperature").max), false);
    const topP = number("pg-top-p", "top_p", 0, 1, false);
    const maxTokens = number("pg-max", "max_tokens", 1, Number($("pg-max").max), true);
    if (temperature !== undefined) params.temperature = temperature;
    if (topP !== undefined) params.top_p = topP;
    if (maxTokens !== undefined) params.max_tokens = maxTokens;
    const stops = $("pg-stop-seq").value.split("\n").map((s) => s.replace(/\r$/, "")).filter((s) => s !== "");
    if (stops.length > 4) { $("pg-stop-seq").focus(); throw new Error("At most 4 stop sequences."); }
    if (stops.length) params.stop = stops;
    return params;
  }

  // ---- the system prompt for the try: a token from the console carries it ----
  async function tokenFor(fields) {
    const body = new URLSearchParams(fields);
    const response = await fetch(form.dataset.overrideUrl, {
      method: "POST", credentials: "same-origin", body: body,
      headers: {"X-CSRFToken": csrf, "Accept": "application/json"},
    });
    if (response.redirected) throw new Error("your console session has ended: sign in again.");  // to the login page
    const data = await response.json().catch(() => ({}));
    if (!response.ok || !data.token) throw new Error(data.error || ("HTTP " + response.status));
    form.dataset.token = data.token;
    return data;
  }

  async function applyPrompt() {
    const text = systemText.value;
    await tokenFor({system_prompt: text});
    appliedPrompt = text;
    carries = {system_prompt: text};
    hideTryingBanner();
    promptLabel = text === "" ? "no system prompt (for this try)" : "the system prompt typed here (for this try)";
    $("pg-system-state").textContent = text === "" ? "none (for this try)" : "edited (for this try)";
    systemStatus.textContent = text === "" ? "Requests from this page now go without a system prompt." :
      "Requests from this page now use this system prompt.";
  }

  function hideTryingBanner() {  // "Trying system prompt vN" is no longer what the page sends
    const banner = document.querySelector(".banner[data-trying]");
    if (banner) banner.hidden = true;
  }

  // A token past its hour (or its user's session) is refused with 401: a new one, for the same prompt, and one retry.
  async function renewToken() {
    await tokenFor(carries || {reset: "1"});
  }

  let renewal = null;
  function renewing(side) {
    side.status.textContent = "Renewing the page's session…";
    if (!renewal) renewal = renewToken().finally(() => { renewal = null; });
    return renewal;
  }

  if ($("pg-system-apply")) $("pg-system-apply").addEventListener("click", function () {  // admins and owners
    applyPrompt().catch((err) => { systemStatus.textContent = "Error: " + err.message; });
  });
  $("pg-system-reset").addEventListener("click", function () {
    tokenFor({reset: "1"}).then(function (data) {
      systemText.value = data.system_prompt || "";
      appliedPrompt = systemText.value;
      carries = null;
      hideTryingBanner();
      promptLabel = "the live system prompt";
      $("pg-system-state").textContent = data.system_prompt ? "the live prompt" : "none";
      systemStatus.textContent = "Requests from this page use the live system prompt again.";
    }).catch((err) => { systemStatus.textContent = "Error: " + err.message; });
  });

  // ---- streaming one column ----
  async function stream(key, body, controller) {
    const side = sides[key];
    const out = bubble(key, "assistant", "");
    side.status.textContent = "Waiting for the first token…";
    const started = performance.now(), mine = generation;
    let firstTokenMs = null, answer = "", usage = null;
    try {
      const request = () => fetch(endpoint, {
        method: "POST", signal: controller.signal,
        headers: {"Content-Type": "application/json", "Authorization": "Bearer " + form.dataset.token},
        body: JSON.stringify(body),
      });
      let response = await request();
      if (response.status === 401) {
        await renewing(side);
        response = await request();
      }
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || ("HTTP " + response.status));
      }
      const reader = response.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || chunk.error);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (firstTokenMs === null) { firstTokenMs = performance.now() - started; side.status.textContent = "Streaming…"; }
            answer += delta.content;
            out.textContent = answer;
            side.log.scrollTop = side.log.scrollHeight;
          }
          if (chunk.usage) usage = chunk.usage;
        }
      }
      if (mine !== generation) return "cleared";
      side.history.push({role: "assistant", content: answer});
      side.status.textContent = "Done" + (usage ? " · " + usage.prompt_tokens + " input tokens" + (appliedPrompt ? " (system prompt included)" : "") + " · " +
        usage.completion_tokens + " output tokens" : "") + (firstTokenMs !== null ? " · first token after " + Math.round(firstTokenMs) + " ms" : "") + ".";
      return "ok";
    } catch (err) {
      if (mine !== generation) return "cleared";  // cleared meanwhile: nothing to keep, nothing to say
      if (err.name === "AbortError" && answer) {
        side.history.push({role: "assistant", content: answer});  // what came before Stop stays in the conversation
        side.status.textContent = "Stopped.";
        return "stopped";
      } else {
        side.history.pop();  // the message got no answer: it is not part of this column's conversation
        const asked = out.parentElement.previousElementSibling;
        if (asked && asked.classList.contains("pg-user")) asked.querySelector(".pg-who").textContent = "You (not kept: no answer)";
        out.parentElement.remove();
        side.status.textContent = err.name === "AbortError" ? "Stopped before any answer; the message was not kept." : "Error: " + err.message;
      }
      return err.name === "AbortError" ? "stopped" : "failed";
    }
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    if (controllers.length) return;
    const text = message.value;
    if (text.trim() === "") { status.textContent = "Write a message first."; message.focus(); return; }
    let params;
    try { params = parameters(); } catch (err) { status.textContent = err.message; return; }
    send.disabled = true; stop.disabled = false; status.textContent = "Sending…";
    try {
      if (systemText.value !== appliedPrompt) await applyPrompt();
    } catch (err) {
      status.textContent = "System prompt not applied: " + err.message;
      send.disabled = false; stop.disabled = true;
      return;
    }
    const keys = active(), runsOf = generation;
    lastSent = [];
    const runs = keys.map(function (key) {
      const side = sides[key];
      side.history.push({role: "user", content: text});
      bubble(key, "user", text);
      const body = Object.assign({model: side.select.value, messages: side.history.slice()}, params,
                                 {stream: true, stream_options: {include_usage: true}});
      lastSent.push(body);
      const controller = new AbortController();
      controllers.push(controller);
      return stream(key, body, controller);
    });
    message.value = "";
    renderCode();
    const done = await Promise.all(runs);
    controllers = [];
    send.disabled = false; stop.disabled = true;
    const failed = done.filter((how) => how === "failed").length;
    if (runsOf !== generation) return;  // New conversation was pressed meanwhile
    if (failed) status.textContent = (failed === keys.length ? "No answer" : "One answer is missing") + ": see the model's column.";
    else if (done.includes("stopped")) status.textContent = "Stopped.";
    else status.textContent = keys.length === 2 ? "Both answers are in." : "Answer is in.";
  });

  stop.addEventListener("click", function () { for (const controller of controllers) controller.abort(); });
  message.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); form.requestSubmit(); }
  });

  // ---- view code ----
  function shellQuote(text) { return "'" + text.replace(/'/g, "'\\''") + "'"; }

  function python(value, indent) {
    const pad = "    ".repeat(indent + 1), end = "    ".repeat(indent);
    if (value === null) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (typeof value === "string" || typeof value === "number") return JSON.stringify(value);
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      return "[\n" + value.map((v) => pad + python(v, indent + 1) + ",\n").join("") + end + "]";
    }
    const entries = Object.entries(value);
    if (!entries.length) return "{}";
    if (entries.every(([, v]) => v === null || typeof v !== "object")) {  // a message, stream_options: on one line
      const inline = "{" + entries.map(([k, v]) => JSON.stringify(k) + ": " + python(v, 0)).join(", ") + "}";
      if (inline.length <= 100) return inline;
    }
    return "{\n" + entries.map(([k, v]) => pad + JSON.stringify(k) + ": " + python(v, indent + 1) + ",\n").join("") + end + "}";
  }

  function curlFor(body) {
    return "curl " + endpoint + " \\\n  -H \"Authorization: Bearer $API_KEY\" \\\n  -H \"Content-Type: application/json\" \\\n  -N \\\n  -d " +
      shellQuote(JSON.stringify(body, null, 2));
  }

  function pythonFor(body) {
    const args = Object.entries(body).map(([k, v]) => "    " + k + "=" + python(v, 1) + ",\n").join("");
    return "import os\n\nfrom openai import OpenAI\n\n" +
      "client = OpenAI(base_url=" + JSON.stringify(endpoint.replace(/\/chat\/completions$/, "")) + ", api_key=os.environ[\"API_KEY\"])\n" +
      "stream = client.chat.completions.create(\n" + args + ")\n" +
      "for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n" +
      "        print(chunk.choices[0].delta.content, end=\"\", flush=True)\n    if chunk.usage:\n        print(\"\\n\", chunk.usage)\n";
  }

  function codeBlock(parent, heading, language, text) {
    const h = document.createElement("h4");
    h.textContent = heading;
    const pre = document.createElement("pre");
    pre.className = "mono small playground-output";
    pre.dataset.code = language;
    pre.tabIndex = 0;
    pre.setAttribute("aria-label", heading);
    pre.textContent = text;
    parent.append(h, pre);
  }

  function renderCode() {
    codeBody.textContent = "";
    const note = document.createElement("p");
    note.className = "muted small";
    note.textContent = "These requests were sent with " + promptLabel + ". With an API key the gateway applies your live " +
      "system prompt; to send another yourself, put it first in messages with the role \"system\" (your model settings' " +
      "system-message rule then applies).";
    codeBody.append(note);
    for (const body of lastSent) {
      const section = document.createElement("div");
      section.dataset.model = body.model;
      const h = document.createElement("h3");
      h.textContent = body.model;
      section.append(h);
      codeBlock(section, "curl · " + body.model, "curl", curlFor(body));
      codeBlock(section, "Python (openai SDK) · " + body.model, "python", pythonFor(body));
      codeBody.append(section);
    }
    codeToggle.disabled = false;
  }

  codeToggle.addEventListener("click", function () {
    const open = codeBody.hidden;
    codeBody.hidden = !open;
    codeToggle.setAttribute("aria-expanded", String(open));
    codeToggle.textContent = open ? "Hide code" : "View code";
  });
})();
