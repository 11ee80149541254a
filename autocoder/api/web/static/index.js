// The prompt page: one session per tab, named in the URL (?session=…) so that a reload or a
// History link reopens it with its turns. Each prompt streams its attempts as they happen:
// the model's reply as it is written, then the code, its output and the outcome.
"use strict";

(() => {
  const { api, el, notice, output, stream, seconds } = AC;
  const POLL_MS = 1500;
  let sessionId = null;
  let live = null;  // the prompt in progress: { runId, view, aborter, stopping }
  let follow = true;  // keep the newest output in view, unless the user scrolled up
  let closedShown = false;  // the turns on the page are a closed session's
  const conv = () => document.getElementById("conversation");
  const byId = (id) => document.getElementById(id);

  function field(id) { return byId(id).value.trim(); }

  // --- the session, in the URL --------------------------------------------------------

  function setSession(id) {
    sessionId = id;
    byId("session-label").textContent = id || "";
    const url = id ? "/?session=" + encodeURIComponent(id) : "/";
    if (location.pathname + location.search !== url) history.replaceState(null, "", url);
  }

  async function openSession() {
    const body = {};
    if (field("timeout")) body.timeout = Number(field("timeout"));
    if (field("model")) body.model = field("model");
    const resp = await api("/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    }, send);
    setSession((await resp.json()).session_id);
    if (closedShown) {
      closedShown = false;
      conv().replaceChildren();  // a new session starts on a clean page
      notice("");
    }
  }

  // A session named in the URL: its turns so far, then the prompt box goes on with it.
  async function resume(id) {
    let info;
    try {
      info = await (await api("/sessions/" + encodeURIComponent(id), {}, () => resume(id))).json();
    } catch (e) {
      if (e instanceof AC.Refused && e.message !== "token") setSession(null);
      else if (!(e instanceof AC.Refused)) notice(String(e));
      return;
    }
    conv().replaceChildren();
    for (const run of info.runs) await showRecorded(run.run_id, run.prompt);
    if (info.status === "open") {
      setSession(info.session_id);
      if (info.running) await waitForRunning(info.session_id, info.running);
    } else {
      sessionId = null;
      closedShown = true;
      byId("session-label").textContent = info.session_id + " (closed)";
      notice("This session is closed (" + (info.closed_reason || "closed") +
        "): its turns are shown; a new prompt opens a new session.");
    }
  }

  // A prompt that was still running when the page was (re)loaded: its stream belonged to the
  // page before, so this one shows it when it ends, and can still stop it.
  async function waitForRunning(sid, runId) {
    const view = turn("(a prompt sent before this page was loaded)");
    view.status.textContent = "still running…";
    busy(true, { runId, view, aborter: null, stopping: false });
    try {
      for (;;) {
        await new Promise((r) => setTimeout(r, POLL_MS));
        const info = await (await api("/sessions/" + encodeURIComponent(sid))).json();
        if (info.running !== runId) break;
      }
      view.box.remove();
      const run = await (await api("/runs/" + encodeURIComponent(runId))).json();
      replay(turn(run.prompt), run);
    } catch (e) {
      if (!(e instanceof AC.Refused)) notice(String(e));
    } finally {
      busy(false);
    }
  }

  async function showRecorded(runId, prompt) {
    const view = turn(prompt);
    try {
      replay(view, await (await api("/runs/" + encodeURIComponent(runId))).json());
    } catch (e) {
      view.status.textContent = "(its record could not be read)";
    }
  }

  // A finished run drawn through the same steps as its live stream.
  function replay(view, r) {
    view.timeout = r.timeout;
    const last = r.attempts.length - 1;
    r.attempts.forEach((a, i) => {
      onEvent(view, "attempt_started", { attempt: a.number, data: { max_attempts: r.attempts.length } });
      onEvent(view, "code_generated", { attempt: a.number, data: a });
      const outs = view.current.querySelector(".outputs");
      if (i !== last) {
        if (a.output) outs.append(el("pre", { class: "out stdout", text: AC.stripAnsi(a.output) }));
        if (a.stderr) outs.append(el("pre", { class: "out stderr", text: AC.stripAnsi(a.stderr) }));
      }
      onEvent(view, "attempt_finished", { attempt: a.number, data: a });
    });
    onEvent(view, "run_finished", { data: r });
  }

  // --- one prompt's view ----------------------------------------------------------------

  function runForm(prompt) {
    const form = new FormData();
    form.append("prompt", prompt);
    for (const name of ["max_attempts", "timeout", "model"]) {
      if (field(name)) form.append(name, field(name));
    }
    for (const f of byId("files").files) form.append("files", f, f.name);
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
    keepInView();
    return { box, attempts, status, current: null, timeout: null };
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

  function modelTime(d) {
    return "model " + seconds(d.llm_duration) + (d.tokens ? " (" + d.tokens + " tokens)" : "");
  }

  // What an attempt came to, in the words the notebook uses: a timeout is a limit reached.
  function outcome(view, d) {
    if (d.status === "success") return "ran cleanly · " + modelTime(d) + " · code " + seconds(d.exec_duration);
    if (d.error_kind === "timeout") {
      const limit = view.timeout ? view.timeout + " s" : "its time limit";
      return "stopped after " + limit + " (timeout) · " + modelTime(d);
    }
    if (d.error_kind === "cancelled") return "stopped (cancelled)";
    const ran = d.exec_duration ? " · code " + seconds(d.exec_duration) : "";
    return "failed (" + (d.error_kind || "error") + ") · " + modelTime(d) + ran;
  }

  function onEvent(view, name, ev) {
    const d = ev.data || {};
    if (name === "run_started") {
      if (live && live.view === view) live.runId = ev.run_id;
      view.timeout = d.timeout;
    } else if (name === "attempt_started") {
      const block = el("section", { class: "attempt", "data-attempt": String(ev.attempt) });
      block.append(el("h3", { text: "Attempt " + ev.attempt + (d.max_attempts ? " of " + d.max_attempts : "") }));
      block.append(el("p", { class: "timing muted", text: "the model is writing…" }));
      view.attempts.append(block);
      view.current = block;
    } else if (name === "token" && view.current) {
      let reply = view.current.querySelector("pre.reply");
      if (!reply) {
        reply = el("pre", { class: "reply", "aria-label": "the model's reply, as it is written" });
        view.current.append(reply);
      }
      reply.append(document.createTextNode(d.text || ""));
    } else if (name === "code_generated" && view.current) {
      const reply = view.current.querySelector("pre.reply");
      if (reply) reply.remove();
      view.current.append(AC.code(d.code || "(the model wrote no code)"));
      view.current.append(el("div", { class: "outputs" }));
      view.current.querySelector(".timing").textContent =
        modelTime(d) + (d.code ? " · running…" : "");
    } else if (name === "output" && view.current) {
      const outs = view.current.querySelector(".outputs") || view.current;
      outs.append(preview(d));
    } else if (name === "attempt_finished" && view.current) {
      const ok = d.status === "success";
      const timing = view.current.querySelector(".timing");
      if (timing) timing.remove();
      const explained = ["timeout", "cancelled"].includes(d.error_kind);
      if (!ok && d.error && !explained) {
        // The whole traceback takes the place of the one-line preview the stream showed.
        const shortened = view.current.querySelector(".outputs pre.traceback");
        if (shortened) shortened.remove();
        view.current.append(el("pre", { class: "error traceback", text: AC.stripAnsi(d.error) }));
      }
      view.current.append(el("p", { class: "attempt-status " + (ok ? "ok" : "bad"), text: outcome(view, d) }));
      if (d.notice) view.current.append(el("p", { class: "notice", text: d.notice }));
      if (!ok && d.error_kind !== "cancelled") view.current.append(el("p", { class: "muted retry", text: "The error goes back to the model." }));
    } else if (name === "run_finished") {
      // An attempt a Stop cut short gets no attempt_finished: it ends here.
      if (view.current && !view.current.querySelector(".attempt-status")) {
        const timing = view.current.querySelector(".timing");
        if (timing) timing.remove();
        const cut = d.error_kind === "cancelled" ? "stopped (cancelled)" : "did not finish";
        view.current.append(el("p", { class: "attempt-status bad", text: cut }));
      }
      // The stream carries previews; the result has the last attempt's outputs in full.
      const outs = view.current && view.current.querySelector(".outputs");
      // A timeout's interrupt is not the code's error (records made before it was left out kept it).
      const full = (d.outputs || []).filter((o) => d.error_kind !== "timeout" || o.output_type !== "error");
      if (outs && full.length) {
        outs.replaceChildren(...full.map(output));
        const twice = view.current.querySelector(":scope > pre.error");
        if (twice && full.some((o) => o.output_type === "error")) twice.remove();
      }
      const ok = d.status === "success";
      const said = ok ? "success" : d.error_kind === "cancelled" ? "stopped" : d.status;
      const why = d.error && d.error_kind !== "cancelled" ? ": " + d.error : "";
      view.status.className = "status " + (ok ? "ok" : "bad");
      view.status.textContent = said + " after " + seconds(d.duration) + why;
      view.status.append(" ", el("a", { href: "/history/" + encodeURIComponent(d.run_id) }, "open the run"));
      if (live && live.view === view) byId("stop").hidden = true;  // nothing left to stop
    } else if (name === "server_error") {
      view.status.className = "status bad";
      view.status.textContent = "server error: " + (ev.detail || "");
    }
    keepInView();
  }

  // --- sending, stopping, following -------------------------------------------------------

  function busy(on, state) {
    live = on ? state : null;
    byId("send").disabled = on;
    byId("stop").hidden = !on;
    byId("stop").disabled = false;
  }

  async function send() {
    const prompt = byId("prompt").value;
    if (!prompt.trim() || live) return;
    notice("");
    byId("send").disabled = true;
    let view = null;
    try {
      if (!sessionId) await openSession();
      const form = runForm(prompt);
      view = turn(prompt);
      follow = true;
      busy(true, { runId: null, view, aborter: new AbortController(), stopping: false });
      let resp;
      try {
        resp = await api("/sessions/" + encodeURIComponent(sessionId) + "/run", {
          method: "POST",
          headers: { Accept: "text/event-stream" },
          body: form,
          signal: live.aborter.signal,
        }, send);
      } catch (e) {
        view.box.remove();
        if (String(e.message).includes("closed")) setSession(null);
        throw e;
      }
      byId("prompt").value = "";
      byId("files").value = "";
      await stream(resp, (name, ev) => onEvent(view, name, ev));
    } catch (e) {
      if (e && e.name === "AbortError") {
        if (view) { view.status.className = "status bad"; view.status.textContent = "stopped before it started"; }
      } else if (!(e instanceof AC.Refused)) {
        notice(String(e));
      }
    } finally {
      busy(false);
      byId("send").disabled = false;
    }
  }

  // Stop: the server interrupts the kernel and records the run as cancelled; the stream then
  // ends with the run's outcome. A prompt still waiting for a run slot is simply hung up on.
  async function stop() {
    if (!live || live.stopping) return;
    live.stopping = true;
    byId("stop").disabled = true;
    if (!live.runId) {
      if (live.aborter) live.aborter.abort();
      return;
    }
    try {
      await api("/runs/" + encodeURIComponent(live.runId) + "/cancel", { method: "POST" });
    } catch (e) {
      if (!(e instanceof AC.Refused)) notice(String(e));
    }
  }

  function atBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40;
  }

  function keepInView() {
    if (follow) window.scrollTo(0, document.documentElement.scrollHeight);
  }

  document.addEventListener("DOMContentLoaded", () => {
    byId("prompt-form").addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });
    byId("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        byId("prompt-form").requestSubmit();
      }
    });
    byId("stop").addEventListener("click", stop);
    window.addEventListener("scroll", () => { follow = atBottom(); }, { passive: true });
    byId("new-session").addEventListener("click", async () => {
      if (sessionId) {
        try { await api("/sessions/" + encodeURIComponent(sessionId), { method: "DELETE" }); } catch (_) { /* already closed */ }
      }
      setSession(null);
      closedShown = false;
      notice("");
      conv().replaceChildren();
    });
    const named = new URLSearchParams(location.search).get("session");
    if (named) resume(named);
  });
})();
