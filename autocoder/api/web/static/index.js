// The prompt page: one session per tab; each prompt streams its attempts as they happen.
"use strict";

(() => {
  const { api, el, notice, output, stream, seconds } = AC;
  let sessionId = null;
  const conv = () => document.getElementById("conversation");

  function field(id) { return document.getElementById(id).value.trim(); }

  async function openSession() {
    const body = {};
    if (field("timeout")) body.timeout = Number(field("timeout"));
    if (field("model")) body.model = field("model");
    const resp = await api("/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    }, send);
    sessionId = (await resp.json()).session_id;
    document.getElementById("session-label").textContent = sessionId;
  }

  function runForm(prompt) {
    const form = new FormData();
    form.append("prompt", prompt);
    for (const name of ["max_attempts", "timeout", "model"]) {
      if (field(name)) form.append(name, field(name));
    }
    for (const f of document.getElementById("files").files) form.append("files", f, f.name);
    return form;
  }

  // One prompt's view: the prompt, then a block per attempt, then the final status.
  function turn(prompt) {
    const box = el("div", { class: "turn" });
    box.append(el("p", { class: "prompt-text", text: prompt }));
    const attempts = el("div", { class: "attempts" });
    const status = el("p", { class: "status running", text: "running…" });
    box.append(attempts, status);
    conv().append(box);
    return { box, attempts, status, current: null };
  }

  // An output as the stream previews it: text as it comes, rich data once the run ends.
  function preview(d) {
    if (d.output_type === "stream") return output(d);
    if (d.output_type === "error") return el("pre", { class: "out traceback", text: d.ename + ": " + d.evalue });
    const box = el("div", { class: "preview" });
    if (d.text) box.append(el("pre", { class: "out result", text: AC.stripAnsi(d.text) }));
    const rich = (d.mimetypes || []).filter((m) => m !== "text/plain");
    if (rich.length) box.append(el("p", { class: "muted", text: "(" + rich.join(", ") + ": shown when the run ends)" }));
    return box;
  }

  function onEvent(view, name, ev) {
    const d = ev.data || {};
    if (name === "attempt_started") {
      const block = el("section", { class: "attempt", "data-attempt": String(ev.attempt) });
      block.append(el("h3", { text: "Attempt " + ev.attempt + (d.max_attempts ? " of " + d.max_attempts : "") }));
      view.attempts.append(block);
      view.current = block;
    } else if (name === "code_generated" && view.current) {
      view.current.append(AC.code(d.code || "(the model wrote no code)"));
      view.current.append(el("div", { class: "outputs" }));
    } else if (name === "output" && view.current) {
      const outs = view.current.querySelector(".outputs") || view.current;
      outs.append(preview(d));
    } else if (name === "attempt_finished" && view.current) {
      const ok = d.status === "success";
      const line = ok ? "ran cleanly" : "failed (" + (d.error_kind || "error") + ")";
      view.current.append(el("p", { class: "attempt-status " + (ok ? "ok" : "bad"), text: line + ", " + seconds(d.duration) }));
      if (!ok && d.error) view.current.append(el("pre", { class: "error", text: AC.stripAnsi(d.error) }));
      if (d.notice) view.current.append(el("p", { class: "notice", text: d.notice }));
      if (!ok) view.current.append(el("p", { class: "muted retry", text: "The error goes back to the model." }));
    } else if (name === "run_finished") {
      // The stream carries previews; the result has the last attempt's outputs in full.
      const outs = view.current && view.current.querySelector(".outputs");
      if (outs && (d.outputs || []).length) outs.replaceChildren(...d.outputs.map(output));
      view.status.className = "status " + (d.status === "success" ? "ok" : "bad");
      view.status.textContent = d.status + " after " + seconds(d.duration) + (d.error ? ": " + d.error : "");
      view.status.append(" ", el("a", { href: "/history/" + encodeURIComponent(d.run_id) }, "open the run"));
    } else if (name === "server_error") {
      view.status.className = "status bad";
      view.status.textContent = "server error: " + (ev.detail || "");
    }
  }

  async function send() {
    const prompt = document.getElementById("prompt").value;
    if (!prompt.trim()) return;
    const button = document.getElementById("send");
    button.disabled = true;
    notice("");
    try {
      if (!sessionId) await openSession();
      const form = runForm(prompt);
      const view = turn(prompt);
      let resp;
      try {
        resp = await api("/sessions/" + encodeURIComponent(sessionId) + "/run", {
          method: "POST",
          headers: { Accept: "text/event-stream" },
          body: form,
        }, send);
      } catch (e) {
        view.box.remove();
        if (String(e.message).includes("closed")) sessionId = null;
        throw e;
      }
      document.getElementById("prompt").value = "";
      document.getElementById("files").value = "";
      await stream(resp, (name, ev) => onEvent(view, name, ev));
    } catch (e) {
      if (!(e instanceof AC.Refused)) notice(String(e));
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("prompt-form").addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });
    document.getElementById("new-session").addEventListener("click", async () => {
      if (sessionId) {
        try { await api("/sessions/" + encodeURIComponent(sessionId), { method: "DELETE" }); } catch (_) { /* already closed */ }
      }
      sessionId = null;
      conv().replaceChildren();
      document.getElementById("session-label").textContent = "";
    });
  });
})();
