/* Evaluation page: while a worker runs it, poll its status, move the bar and say rows done of total; reload the page
   for the results once it has finished. */
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("ft-eval");
    if (!box || box.dataset.finished === "1") return;
    function render(s) {
      var badge = document.getElementById("ft-eval-status");
      badge.textContent = s.status_display;
      badge.className = "badge ft-status-" + s.status;
      document.getElementById("ft-eval-bar").value = s.progress;
      document.getElementById("ft-eval-rows").textContent = s.status === "running"
        ? s.rows_done + " of " + s.rows_total + " rows done" : s.finished ? "" : "waiting for a worker…";
    }
    function poll() {
      fetch(box.dataset.statusUrl, {headers: {"Accept": "application/json"}, credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (s) { render(s); if (s.finished) { window.location.reload(); return; } setTimeout(poll, 1500); })
        .catch(function () { setTimeout(poll, 5000); });
    }
    setTimeout(poll, 1500);
  });
})();
