/* Fine-tuning console: XHR upload with a progress bar, live file validation and job polling, and the loss chart in
   inline SVG. */
(function () {
  "use strict";

  function csrfToken(form) {
    var input = form.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  // ---- upload ------------------------------------------------------------------------------------
  function setupUpload() {
    var form = document.getElementById("ft-upload");
    if (!form) return;
    var drop = document.getElementById("ft-drop"), input = document.getElementById("ft-file");
    var bar = document.getElementById("ft-progress"), status = document.getElementById("ft-upload-status");
    var maxBytes = parseInt(form.dataset.maxBytes, 10);

    function send(file) {
      if (!/\.jsonl$/i.test(file.name)) { status.textContent = file.name + " is not a .jsonl file."; return; }
      if (file.size > maxBytes) { status.textContent = file.name + " is larger than the limit."; return; }
      var data = new FormData();
      data.append("file", file);
      var model = document.getElementById("ft-model");
      if (model && model.value) data.append("model", model.value);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRFToken", csrfToken(form));
      xhr.upload.onprogress = function (e) {
        if (e.lengthComputable) { bar.value = Math.round(100 * e.loaded / e.total); status.textContent = "Uploading… " + bar.value + " %"; }
      };
      xhr.onload = function () {
        var body = {};
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = {error: "The server answered " + xhr.status + "."}; }
        if (xhr.status === 200 && body.url) { status.textContent = "Uploaded. Opening the file, where its validation shows…"; window.location = body.url; }
        else { bar.hidden = true; status.textContent = body.error || ("Upload failed (" + xhr.status + ")."); }
      };
      xhr.onerror = function () { bar.hidden = true; status.textContent = "The upload failed: check your connection and try again."; };
      bar.hidden = false; bar.value = 0; status.textContent = "Uploading…";
      xhr.send(data);
    }

    input.addEventListener("change", function () { if (input.files.length) send(input.files[0]); });
    ["dragenter", "dragover"].forEach(function (t) { drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("is-over"); }); });
    ["dragleave", "drop"].forEach(function (t) { drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.remove("is-over"); }); });
    drop.addEventListener("drop", function (e) { if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
    form.addEventListener("submit", function (e) { e.preventDefault(); if (input.files.length) send(input.files[0]); });
  }

  // ---- file validation -----------------------------------------------------------------------------
  // While a worker validates the file (or counts its tokens for a cost preview), poll its status, move the bar, and
  // reload the page for the report once it is there.
  function setupFile() {
    var box = document.getElementById("ft-file");
    if (!box) return;
    var validating = box.dataset.finished !== "1", counting = parseInt(box.dataset.counting || "0", 10);
    if (!validating && !counting) return;

    function render(s) {
      var bar = document.getElementById("ft-file-bar"), text = document.getElementById("ft-file-progress");
      if (bar) { if (s.bytes_validated || s.finished) bar.value = s.progress; else bar.removeAttribute("value"); }
      if (text) text.textContent = s.progress_text.charAt(0).toUpperCase() + s.progress_text.slice(1);
    }

    function poll() {
      fetch(box.dataset.statusUrl, {headers: {"Accept": "application/json"}, credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (s) {
          render(s);
          if ((validating && s.finished) || (!validating && s.counting.length < counting)) { window.location.reload(); return; }
          setTimeout(poll, 1500);
        })
        .catch(function () { setTimeout(poll, 5000); });
    }
    setTimeout(poll, 1500);
  }

  // ---- loss chart --------------------------------------------------------------------------------
  var SVG = "http://www.w3.org/2000/svg";
  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // series: [[key, css class], ...] of the points to draw (default: the training and validation loss).
  var LOSS = [["train_loss", "train"], ["valid_loss", "valid"]];
  // A DPO job's second chart: the preferred (chosen) and non-preferred (rejected) output's rewards and their margin.
  var REWARDS = [["train_chosen_reward", "train"], ["train_rejected_reward", "valid"], ["train_reward_margin", "margin"]];

  function drawChart(svg, points, series) {
    series = series || LOSS;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var W = 600, H = 220, L = 44, R = 10, T = 10, B = 26;
    var all = [];
    points.forEach(function (p) { series.forEach(function (s) { if (p[s[0]] != null) all.push(p[s[0]]); }); });
    if (!all.length) { svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "No metrics yet")); return; }
    var maxStep = Math.max.apply(null, points.map(function (p) { return p.step; })) || 1;
    var hi = Math.max.apply(null, all), lo = Math.min(0, Math.min.apply(null, all));
    if (hi === lo) hi = lo + 1;
    function x(s) { return L + (W - L - R) * s / maxStep; }
    function y(v) { return T + (H - T - B) * (1 - (v - lo) / (hi - lo)); }
    svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "axis"}));
    svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, "class": "axis"}));
    [lo, (lo + hi) / 2, hi].forEach(function (v) { svg.appendChild(el("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end"}, v.toFixed(2))); });
    svg.appendChild(el("text", {x: W - R, y: H - 6, "text-anchor": "end"}, "step " + maxStep));
    series.forEach(function (s) {
      var key = s[0];
      var d = points.filter(function (p) { return p[key] != null; })
        .map(function (p, i) { return (i ? "L" : "M") + x(p.step).toFixed(1) + " " + y(p[key]).toFixed(1); }).join(" ");
      if (d) svg.appendChild(el("path", {d: d, "class": s[1]}));
    });
  }

  // The DPO job's rewards chart and, in words, the latest reward accuracy (share of pairs the preferred output wins).
  function drawRewards(points) {
    var svg = document.getElementById("ft-rewards");
    if (!svg) return;
    drawChart(svg, points, REWARDS);
    var last = points.filter(function (p) { return p.train_reward_accuracy != null; }).pop();
    var text = document.getElementById("ft-reward-accuracy");
    if (text && last) {
      var valid = points.filter(function (p) { return p.valid_reward_accuracy != null; }).pop();
      text.textContent = "Reward accuracy at step " + last.step + ": " + (100 * last.train_reward_accuracy).toFixed(0) + " % of the step's pairs"
        + (valid ? "; " + (100 * valid.valid_reward_accuracy).toFixed(0) + " % of the validation pairs at step " + valid.step : "") + ".";
    }
  }

  // ---- job polling -------------------------------------------------------------------------------
  function setupJob() {
    var box = document.getElementById("ft-job");
    if (!box) return;
    var chart = document.getElementById("ft-chart"), initial = document.getElementById("ft-loss");
    drawChart(chart, initial ? JSON.parse(initial.textContent) : []);
    drawRewards(initial ? JSON.parse(initial.textContent) : []);
    if (box.dataset.finished === "1") return;

    function render(s) {
      var badge = document.getElementById("ft-status");
      badge.textContent = s.status_display || s.status.replace("_", " ");
      badge.className = "badge ft-status-" + s.status;
      var bar = document.getElementById("ft-bar");
      if (s.total_steps || s.finished) bar.value = s.progress; else bar.removeAttribute("value"); // no value: an indeterminate bar
      document.getElementById("ft-steps").textContent = s.total_steps ? "step " + s.step + " of " + s.total_steps
        : s.finished ? "" : s.status === "running" ? "starting: loading the base model…" : "waiting for a worker…";
      var eta = document.getElementById("ft-eta");
      if (s.estimated_finish && !s.finished) {
        var secs = Math.max(0, Math.round((new Date(s.estimated_finish) - new Date()) / 1000));
        eta.textContent = "· about " + (secs >= 90 ? Math.round(secs / 60) + " min" : secs + " s") + " left";
      } else { eta.textContent = ""; }
      if (s.fine_tuned_model) {
        document.getElementById("ft-result").textContent = "Model: " + s.fine_tuned_model + " · " + s.trained_tokens + " trained tokens";
        document.getElementById("ft-next").hidden = false;
      }
      var err = document.getElementById("ft-error");
      if (s.error) { err.hidden = false; err.textContent = s.error.message; }
      var list = document.getElementById("ft-events");
      list.textContent = "";
      s.events.forEach(function (e) {
        var li = document.createElement("li"), t = document.createElement("time");
        li.className = "ft-level-" + e.level; t.textContent = e.created_at.slice(11, 19);
        li.appendChild(t); li.appendChild(document.createTextNode(" " + e.message)); list.appendChild(li);
      });
      drawChart(chart, s.loss);
      drawRewards(s.loss);
      var cancel = document.getElementById("ft-cancel");
      if (cancel && s.finished) cancel.hidden = true;
    }

    function poll() {
      fetch(box.dataset.statusUrl, {headers: {"Accept": "application/json"}, credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (s) { render(s); if (!s.finished) setTimeout(poll, 2000); })
        .catch(function () { setTimeout(poll, 5000); });
    }
    setTimeout(poll, 2000);
  }

  // ---- new-job form: the files and settings of the chosen method -----------------------------------
  // Each file option carries its format (data-format); the method menu says which formats each method trains on.
  // Options of other formats are hidden and disabled, and DPO's settings (beta, the preferred-answer weight) are
  // disabled (so not sent) for supervised jobs.
  function setupJobForm() {
    var form = document.getElementById("ft-job-form");
    var method = form && form.querySelector("select[name=method]");
    if (!method) return;
    var formats = JSON.parse(method.dataset.formats || "{}");
    var dpoOnly = form.querySelectorAll("input[name=beta], input[name=sft_weight]");

    function apply() {
      var wanted = formats[method.value] || [];
      ["training_file", "validation_file"].forEach(function (name) {
        var select = form.querySelector("select[name=" + name + "]");
        if (!select) return;
        Array.prototype.forEach.call(select.options, function (o) {
          var off = !!o.dataset.format && wanted.indexOf(o.dataset.format) < 0;
          o.hidden = off; o.disabled = off;
        });
        var chosen = select.options[select.selectedIndex];
        if (chosen && chosen.disabled) {
          var first = Array.prototype.filter.call(select.options, function (o) { return !o.disabled; })[0];
          select.value = first ? first.value : "";
        }
      });
      Array.prototype.forEach.call(dpoOnly, function (input) { input.disabled = method.value !== "dpo"; });
    }
    method.addEventListener("change", apply);
    apply();
  }

  document.addEventListener("DOMContentLoaded", function () { setupUpload(); setupFile(); setupJob(); setupJobForm(); });
})();
