// Small progressive enhancements for the console. Every page works without this file.
(function () {
  "use strict";

  // Menus (<details>): close on Escape or a click outside.
  document.addEventListener("click", function (e) {
    document.querySelectorAll("details[data-menu][open]").forEach(function (d) {
      if (!d.contains(e.target)) d.removeAttribute("open");
    });
  });
  document.addEventListener("keydown", function (e) {
    if (e.key !== "Escape") return;
    document.querySelectorAll("details[data-menu][open]").forEach(function (d) {
      d.removeAttribute("open");
      d.querySelector("summary").focus();
    });
  });

  // Print buttons (the invoice): no inline handlers, so the Content-Security-Policy can forbid inline scripts.
  document.querySelectorAll("[data-print]").forEach(function (btn) {
    btn.addEventListener("click", function () { window.print(); });
  });

  // Forms that destroy something ask first.
  document.addEventListener("submit", function (e) {
    var msg = e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) e.preventDefault();
  });

  // Copy buttons: <button data-copy="#input">.
  document.querySelectorAll("[data-copy]").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var input = document.querySelector(btn.getAttribute("data-copy"));
      var status = document.querySelector("[data-copy-status]");
      var done = function () { if (status) status.textContent = "Copied to the clipboard."; btn.textContent = "Copied"; };
      input.select();
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(done, function () { document.execCommand("copy"); done(); });
      } else {
        document.execCommand("copy");
        done();
      }
    });
  });

  // Character counters: <span data-char-count-for="id"><span data-count>.
  document.querySelectorAll("[data-char-count-for]").forEach(function (counter) {
    var area = document.getElementById(counter.getAttribute("data-char-count-for"));
    var out = counter.querySelector("[data-count]");
    var max = parseInt(area.getAttribute("data-max-chars"), 10);
    var update = function () {
      var n = area.value.replace(/\r\n/g, "\n").length;
      out.textContent = n.toLocaleString();
      counter.classList.toggle("over", max && n > max);
    };
    area.addEventListener("input", update);
    update();
  });

  // Slug suggestion: follows the name until the user edits the slug.
  var source = document.querySelector("[data-slug-source]");
  var target = document.querySelector("[data-slug-target]");
  if (source && target) {
    var touched = target.value !== "";
    var slugify = function (s) {
      return s.normalize("NFKD").replace(/[\u0300-\u036f]/g, "").toLowerCase()
        .replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40).replace(/-+$/, "");
    };
    target.addEventListener("input", function () { touched = target.value !== ""; });
    source.addEventListener("input", function () { if (!touched) target.value = slugify(source.value); });
  }
})();
