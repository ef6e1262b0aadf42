// Streams a chat completion from the gateway (SSE over fetch) into the page.
(function () {
  "use strict";
  const form = document.getElementById("playground");
  if (!form) return;
  const out = document.getElementById("pg-output"), status = document.getElementById("pg-status");
  const usage = document.getElementById("pg-usage"), send = document.getElementById("pg-send"), stop = document.getElementById("pg-stop");
  let controller = null;

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    out.textContent = ""; usage.textContent = ""; status.textContent = "Waiting for the first token…";
    send.disabled = true; stop.disabled = false;
    controller = new AbortController();
    const started = performance.now();
    let firstTokenMs = null;
    try {
      const response = await fetch(form.dataset.endpoint, {
        method: "POST",
        signal: controller.signal,
        headers: {"Content-Type": "application/json", "Authorization": "Bearer " + form.dataset.token},
        body: JSON.stringify({
          model: form.model.value,
          messages: [{role: "user", content: form.message.value}],
          max_tokens: parseInt(form.max_tokens.value, 10) || undefined,
          stream: true,
          stream_options: {include_usage: true},
        }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error((body.error && body.error.message) || ("HTTP " + response.status));
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
          const data = event.split("\n").filter(l => l.startsWith("data:")).map(l => l.slice(5).trim()).join("");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || chunk.error);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (firstTokenMs === null) { firstTokenMs = performance.now() - started; status.textContent = "Streaming…"; }
            out.textContent += delta.content;
          }
          if (chunk.usage) {
            usage.textContent = chunk.usage.prompt_tokens + " input tokens (system prompt included) · " + chunk.usage.completion_tokens + " output tokens";
          }
        }
      }
      status.textContent = "Done" + (firstTokenMs !== null ? " · first token after " + Math.round(firstTokenMs) + " ms" : "") + ".";
    } catch (err) {
      status.textContent = err.name === "AbortError" ? "Stopped." : "Error: " + err.message;
    } finally {
      send.disabled = false; stop.disabled = true; controller = null;
    }
  });
  stop.addEventListener("click", function () { if (controller) controller.abort(); });
})();
