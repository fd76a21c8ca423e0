/* kefu console: progressive enhancement only; every page works without this script.
   - Live updates: the server's event stream says "change"; the page fetches itself again and swaps
     the parts marked data-live (the server renders them, so no client-side templates).
   - Replies are sent without a page reload and the box is cleared. */
(function () {
  "use strict";

  function swapLive(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    document.querySelectorAll("[data-live][id]").forEach(function (el) {
      var fresh = doc.getElementById(el.id);
      if (fresh) { el.replaceWith(document.importNode(fresh, true)); }
    });
    var transcript = document.getElementById("transcript");
    if (transcript) { transcript.scrollTop = transcript.scrollHeight; }
  }

  var refreshing = false, again = false;
  function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html) { swapLive(html); } })
      .catch(function () { /* next change event tries again */ })
      .then(function () {
        refreshing = false;
        if (again) { again = false; refresh(); }
      });
  }

  function listen() {
    var url = document.body.getAttribute("data-live-events");
    if (!url || !window.EventSource) { return; }
    var source = new EventSource(url);
    source.addEventListener("change", refresh);
    source.onopen = function () { document.body.classList.add("live"); };
    source.onerror = function () { document.body.classList.remove("live"); };
  }

  function enhanceReply() {
    var form = document.getElementById("reply-form");
    if (!form || !window.fetch) { return; }
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var box = form.querySelector("textarea");
      var text = box.value.trim();
      if (!text) { return; }
      var button = form.querySelector("button");
      button.disabled = true;
      fetch(form.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json" },
        body: JSON.stringify({ text: text })
      }).then(function (r) {
        return r.json().then(function (body) { return { ok: r.ok, body: body }; });
      }).then(function (result) {
        if (result.ok) { box.value = ""; refresh(); }
        else { window.alert(result.body.error || "failed"); }
      }).catch(function () {
        window.alert("发送失败 Sending failed");
      }).then(function () { button.disabled = false; box.focus(); });
    });
    form.querySelector("textarea").addEventListener("keydown", function (event) {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { form.requestSubmit(); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    listen();
    enhanceReply();
    var transcript = document.getElementById("transcript");
    if (transcript) { transcript.scrollTop = transcript.scrollHeight; }
  });
})();
