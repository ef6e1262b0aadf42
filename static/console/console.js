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
  // Narrow screens: the side nav folds behind a "Menu" button (aria-expanded) that names the current page.
  var nav = document.querySelector("[data-nav]");
  var toggle = nav && nav.querySelector(".nav-toggle");
  if (toggle) {
    var current = nav.querySelector("a[aria-current=page]");
    nav.querySelector("[data-nav-current]").textContent = current ? current.textContent.trim() : "";
    nav.classList.add("js-nav");
    toggle.hidden = false;
    var setOpen = function (open) {
      nav.classList.toggle("is-open", open);
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    };
    toggle.addEventListener("click", function () { setOpen(!nav.classList.contains("is-open")); });
    nav.addEventListener("keydown", function (e) {
      if (e.key === "Escape" && nav.classList.contains("is-open")) { setOpen(false); toggle.focus(); }
    });
  }

  // Tables become cards at narrow widths (console.css, .table-cards): each cell is labelled with its column's
  // header. Explicit roles keep the table a table for screen readers once CSS displays its parts as blocks.
  var cardify = function (table) {
    var heads = table.querySelectorAll("thead th");
    if (!heads.length || table.hasAttribute("data-no-cards")) return;
    var labels = Array.prototype.map.call(heads, function (th) { return th.textContent.trim(); });
    table.setAttribute("role", "table");
    table.querySelectorAll("thead, tbody, tfoot").forEach(function (g) { g.setAttribute("role", "rowgroup"); });
    table.querySelectorAll("tr").forEach(function (tr) {
      tr.setAttribute("role", "row");
      var col = 0;
      Array.prototype.forEach.call(tr.children, function (cell) {
        var inHead = cell.parentNode.parentNode.tagName === "THEAD";
        if (inHead) cell.setAttribute("role", "columnheader");
        else if (cell.tagName === "TH") cell.setAttribute("role", "rowheader");
        else cell.setAttribute("role", "cell");
        if (!inHead && labels[col] && !cell.hasAttribute("data-label") && !cell.hasAttribute("colspan")) cell.setAttribute("data-label", labels[col]);
        col += cell.colSpan || 1;
      });
    });
    table.classList.add("table-cards");
    // A long table folds to its first rows at narrow widths (CSS hides .is-folded there only), with a button for the rest.
    var rows = table.tBodies.length ? table.tBodies[0].rows : [];
    var keep = 6;
    if (rows.length > keep + 4 && !table.hasAttribute("data-no-fold")) {
      Array.prototype.forEach.call(rows, function (tr, i) { if (i >= keep) tr.classList.add("is-folded"); });
      var more = document.createElement("button");
      more.type = "button";
      more.className = "btn btn-sm table-unfold";
      more.textContent = "Show all " + rows.length + " rows";
      more.addEventListener("click", function () {
        Array.prototype.forEach.call(rows, function (tr) { tr.classList.remove("is-folded"); });
        more.remove();
        if (rows[keep]) { var first = rows[keep].querySelector("td, th"); if (first) { first.setAttribute("tabindex", "-1"); first.focus(); } }
      });
      (table.closest(".table-wrap") || table).insertAdjacentElement("afterend", more);
    }
  };
  document.querySelectorAll("table").forEach(cardify);

  // Scrollers (a wide table, the job's event list, a diff): when their content overflows, keyboard users can focus
  // and scroll them (WCAG 2.1.1); the region is named after its table's caption or the nearest heading.
  var scrollers = ".table-wrap, .ft-events, .diff, pre, .ft-line";
  var nameOf = function (el) {
    var caption = el.querySelector("caption");
    if (caption) return caption.textContent.trim();
    var section = el.closest("section, .card, figure");
    var heading = section && section.querySelector("h2, h3, figcaption");
    return heading ? heading.textContent.trim() : "Scrollable content";
  };
  var markScrollable = function () {
    document.querySelectorAll(scrollers).forEach(function (el) {
      var overflows = el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1;
      if (overflows && !el.hasAttribute("tabindex")) {
        el.setAttribute("tabindex", "0");
        el.setAttribute("data-scroll-region", "");
        if (!el.hasAttribute("aria-label") && el.tagName === "DIV") { el.setAttribute("role", "region"); el.setAttribute("aria-label", nameOf(el)); }
        else if (!el.hasAttribute("aria-label")) el.setAttribute("aria-label", nameOf(el));
      } else if (!overflows && el.hasAttribute("data-scroll-region")) {
        el.removeAttribute("tabindex");
        el.removeAttribute("data-scroll-region");
      }
    });
  };
  markScrollable();
  window.addEventListener("resize", markScrollable);
  document.addEventListener("toggle", markScrollable, true); // a chart's table view opened
  if (window.MutationObserver) { // lists that grow while polled (the job's events)
    var pending = false;
    new MutationObserver(function () {
      if (pending) return;
      pending = true;
      window.requestAnimationFrame(function () { pending = false; markScrollable(); });
    }).observe(document.body, { childList: true, subtree: true });
  }

  // Live pages (<div data-live-refresh="5" id=…>): the region is fetched again and replaced in place, every n
  // seconds while the tab is visible, instead of reloading the whole page (which loses the reader's place).
  document.querySelectorAll("[data-live-refresh][id]").forEach(function (region) {
    var seconds = Math.max(2, parseInt(region.getAttribute("data-live-refresh"), 10) || 5);
    var busy = false;
    var refresh = function () {
      if (busy || document.hidden) return;
      busy = true;
      fetch(window.location.href, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(region.id);
          if (!fresh) return;
          var open = Array.prototype.map.call(region.querySelectorAll("details"), function (d) { return d.open; });
          region.innerHTML = fresh.innerHTML;
          region.querySelectorAll("details").forEach(function (d, i) { if (open[i]) d.open = true; });
          region.querySelectorAll("table").forEach(cardify);
          region.setAttribute("data-updated", new Date().toISOString());
          markScrollable();
        })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { busy = false; });
    };
    window.setInterval(refresh, seconds * 1000);
  });
})();
