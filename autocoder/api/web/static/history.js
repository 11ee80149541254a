// The history: runs and sessions, newest first, read from the JSON API with the token.
"use strict";

(() => {
  const { api, el, when } = AC;
  const PAGE = 20;
  const state = { runs: 0, sessions: 0 };

  function params() {
    const p = new URLSearchParams({ limit: String(PAGE), offset: String(state.runs) });
    const q = document.getElementById("q").value.trim();
    const status = document.getElementById("status").value;
    if (q) p.set("q", q);
    if (status) p.set("status", status);
    return p;
  }

  // Code given to POST /execute has no prompt: the history says so instead of a blank link.
  function title(r) {
    return r.origin === "code" ? "code given (no model)" : r.prompt;
  }

  function pager(kind, total) {
    document.getElementById(kind + "-prev").disabled = state[kind] === 0;
    document.getElementById(kind + "-next").disabled = state[kind] + PAGE >= total;
    document.getElementById(kind + "-total").textContent = "(" + total + ")";
  }

  async function loadRuns() {
    const resp = await api("/runs?" + params(), {}, load);
    const page = await resp.json();
    const body = document.querySelector("#runs tbody");
    body.replaceChildren(...page.runs.map((r) => el("tr", { class: "run-row", "data-run-id": r.run_id },
      el("td", { text: when(r.started_at) }),
      el("td", { class: r.status === "success" ? "ok" : "bad", text: r.status + (r.error_kind ? " (" + r.error_kind + ")" : "") }),
      el("td", {}, el("a", { href: "/history/" + encodeURIComponent(r.run_id), class: "prompt-link", text: title(r) })),
      el("td", { "data-label": "model", text: r.origin === "code" ? "(none)" : r.model || "" }),
      el("td", { "data-label": "attempts", text: String(r.attempts) }),
      el("td", { "data-label": "seconds", text: (Number(r.duration) || 0).toFixed(1) }),
    )));
    if (!page.runs.length) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "No runs match." })));
    pager("runs", page.total);
  }

  async function loadSessions() {
    const p = new URLSearchParams({ limit: String(PAGE), offset: String(state.sessions) });
    const resp = await api("/sessions?" + p, {}, load);
    const page = await resp.json();
    const body = document.querySelector("#sessions tbody");
    body.replaceChildren(...page.sessions.map((s) => {
      const prompts = el("td", {});
      s.runs.forEach((r, i) => {
        if (i) prompts.append(" · ");
        prompts.append(el("a", { href: "/history/" + encodeURIComponent(r.run_id), class: "session-prompt", text: title(r) }));
      });
      const open = el("a", { href: "/?session=" + encodeURIComponent(s.session_id), class: "session-open" },
        s.status === "open" ? "continue" : "view");
      return el("tr", { class: "session-row", "data-session-id": s.session_id },
        el("td", { text: when(s.created_at) }),
        el("td", {}, s.status + (s.closed_reason ? " (" + s.closed_reason + ")" : "") + " · ", open),
        prompts,
        el("td", {}, AC.download("notebook", "/sessions/" + encodeURIComponent(s.session_id) + "/notebook", s.session_id + ".ipynb")),
      );
    }));
    pager("sessions", page.total);
  }

  async function load() {
    try {
      await loadRuns();
      await loadSessions();
    } catch (e) {
      if (!(e instanceof AC.Refused)) AC.notice(String(e));
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("search-form").addEventListener("submit", (e) => {
      e.preventDefault();
      state.runs = 0;
      load();
    });
    document.getElementById("status").addEventListener("change", () => { state.runs = 0; load(); });
    for (const kind of ["runs", "sessions"]) {
      document.getElementById(kind + "-prev").addEventListener("click", () => { state[kind] = Math.max(0, state[kind] - PAGE); load(); });
      document.getElementById(kind + "-next").addEventListener("click", () => { state[kind] += PAGE; load(); });
    }
    load();
  });
})();
