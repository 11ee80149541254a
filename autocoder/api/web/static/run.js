// One run's page: its prompt, every attempt as the notebook shows it, its downloads.
"use strict";

(() => {
  const { api, el, seconds, when } = AC;

  function attempt(a, last, outputs, timeout, given) {
    const box = el("section", { class: "attempt", "data-attempt": String(a.number) });
    const ok = a.status === "success";
    box.append(el("h3", { text: "Attempt " + a.number }));
    const said = ok ? "ran cleanly" : a.error_kind === "timeout"
      ? "stopped after " + (timeout ? timeout + " s" : "its time limit") + " (timeout)"
      : "failed (" + (a.error_kind || "error") + ")";
    box.append(el("p", { class: "attempt-status " + (ok ? "ok" : "bad"),
      text: said +
        (given ? "" : " · model " + seconds(a.llm_duration)) + " · code " + seconds(a.exec_duration) +
        " · in all " + seconds(a.duration) + (a.model ? " · " + a.model : "") }));
    box.append(AC.code(a.code || "(the model wrote no code)"));
    const outs = el("div", { class: "outputs" });
    // A timeout's interrupt is not the code's error (records made before it was left out kept it).
    if (a.error_kind === "timeout") outputs = outputs.filter((o) => o.output_type !== "error");
    if (last && outputs.length) {
      for (const o of outputs) outs.append(AC.output(o));
    } else {
      if (a.output) outs.append(el("pre", { class: "out stdout", text: AC.stripAnsi(a.output) }));
      if (a.stderr) outs.append(el("pre", { class: "out stderr", text: AC.stripAnsi(a.stderr) }));
    }
    box.append(outs);
    const shown = a.error_kind === "timeout" || (last && outputs.some((o) => o.output_type === "error"));
    if (!ok && a.error && !shown) {
      box.append(el("pre", { class: "error traceback", text: AC.stripAnsi(a.error) }));
    }
    if (a.notice) box.append(el("p", { class: "notice", text: a.notice }));
    if (a.code) box.append(AC.textDownload("code of attempt " + a.number, a.code, "generated_code_" + a.number + ".py"));
    return box;
  }

  async function load() {
    const article = document.getElementById("run");
    const id = article.dataset.runId;
    let r;
    try {
      r = await (await api("/runs/" + encodeURIComponent(id), {}, load)).json();
    } catch (e) {
      if (!(e instanceof AC.Refused)) AC.notice(String(e));
      return;
    }
    const ok = r.status === "success";
    const given = r.origin === "code";
    const last = r.attempts[r.attempts.length - 1];
    const held = ok && last ? last.examples || 0 : 0;
    const head = [
      el("h2", {}, "Run ", el("code", { text: r.run_id })),
      given
        ? el("p", { class: "origin-code", text: "Code given, run as it is: no model wrote it (POST /execute)." })
        : el("p", { class: "prompt-text", text: r.prompt }),
      el("p", { class: "status " + (ok ? "ok" : "bad"), text: r.status + (r.error_kind ? " (" + r.error_kind + ")" : "") }),
      // How sure the answer is: how many of the last attempt's candidates produced it.
      ...(r.candidates > 1 ? [el("p", { class: "agreement", text: r.agreement + " of " + r.candidates + " candidates agree" })] : []),
      // The worked examples of the prompt the answer's code passed (examples.py).
      ...(held ? [el("p", { class: "examples", text: "the prompt's " + held + (held > 1 ? " examples hold" : " example holds") })] : []),
      el("p", { class: "muted" }, "started " + when(r.started_at) + " · " + seconds(r.duration) +
        " · " + r.attempts.length + " attempt(s)" + (r.model ? " · model " + r.model : ""),
        ...(r.session_id ? [" · session ", el("a", { href: "/?session=" + encodeURIComponent(r.session_id), class: "session-link", text: r.session_id })] : [])),
    ];
    const base = "/runs/" + encodeURIComponent(r.run_id);
    const downloads = el("p", { class: "downloads" },
      AC.download("notebook", base + "/notebook", ""),
      " ", AC.download("notebook with its files (.zip)", base + "/bundle", ""));
    for (const f of r.files || []) {
      downloads.append(" ", AC.download(f.name + " (" + f.size + " bytes)", f.url, f.name.split("/").pop()));
    }
    article.replaceChildren(...head, downloads);
    r.attempts.forEach((a, i) => article.append(attempt(a, i === r.attempts.length - 1, r.outputs || [], r.timeout, given)));
    if (!ok && r.error && !r.attempts.length) article.append(el("pre", { class: "error", text: r.error }));
  }

  document.addEventListener("DOMContentLoaded", load);
})();
