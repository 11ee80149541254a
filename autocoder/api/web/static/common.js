// autocoder's page: shared helpers. Data is only ever put in the page with textContent;
// HTML outputs go into sandboxed srcdoc iframes, never into this document.
"use strict";

const AC = (() => {
  const TOKEN_KEY = "autocoder-token";
  let retry = null;

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (token()) h["Authorization"] = "Bearer " + token();
    return h;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function notice(text) {
    const p = document.getElementById("notice");
    p.textContent = text || "";
    p.hidden = !text;
  }

  // The token form: shown after a 401; `again` reruns what was refused once a token is given.
  function askToken(again) {
    retry = again;
    const form = document.getElementById("token-form");
    form.hidden = false;
    document.getElementById("token-input").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const form = document.getElementById("token-form");
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
      form.hidden = true;
      notice("");
      if (retry) { const r = retry; retry = null; r(); }
    });
  });

  class Refused extends Error {}

  async function api(path, opts, again) {
    const o = Object.assign({}, opts || {});
    o.headers = headers(o.headers);
    const resp = await fetch(path, o);
    if (resp.status === 401) {
      if (token()) sessionStorage.removeItem(TOKEN_KEY);
      notice(resp.status + ": " + (await message(resp)));
      if (again) askToken(again);
      throw new Refused("token");
    }
    if (!resp.ok) {
      const text = await message(resp);
      notice("HTTP " + resp.status + ": " + text);
      throw new Refused(text);
    }
    return resp;
  }

  async function message(resp) {
    try {
      const body = await resp.json();
      if (typeof body.message === "string") return body.message;
      if (typeof body.detail === "string") return body.detail;
      return JSON.stringify(body.detail);
    } catch (_) {
      return resp.statusText;
    }
  }

  // Server-sent events over fetch (EventSource cannot POST nor send a token).
  async function stream(resp, onEvent) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(name, JSON.parse(data.join("\n")));
      }
    }
  }

  const ANSI = /\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]/g;
  function stripAnsi(text) { return String(text || "").replace(ANSI, ""); }

  function joined(v) { return Array.isArray(v) ? v.join("") : String(v ?? ""); }

  const KEYWORDS = new Set(("False None True and as assert async await break class continue def del " +
    "elif else except finally for from global if import in is lambda nonlocal not or pass raise " +
    "return try while with yield print").split(" "));
  const TOKEN = /(#[^\n]*)|("""[\s\S]*?"""|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')|\b(\d+(?:\.\d+)?)\b|\b([A-Za-z_]\w*)\b/g;

  // Python code as spans of text: comments, strings, numbers, keywords get a class.
  function code(text) {
    const pre = el("pre", { class: "code" });
    const src = String(text || "");
    let last = 0;
    for (const m of src.matchAll(TOKEN)) {
      if (m.index > last) pre.append(document.createTextNode(src.slice(last, m.index)));
      let cls = null;
      if (m[1]) cls = "c"; else if (m[2]) cls = "s"; else if (m[3]) cls = "n";
      else if (m[4] && KEYWORDS.has(m[4])) cls = "k";
      pre.append(cls ? el("span", { class: cls, text: m[0] }) : document.createTextNode(m[0]));
      last = m.index + m[0].length;
    }
    if (last < src.length) pre.append(document.createTextNode(src.slice(last)));
    return pre;
  }

  // One nbformat v4 output, as a notebook would show it.
  function output(out) {
    const type = out.output_type;
    if (type === "stream") {
      return el("pre", { class: "out " + (out.name === "stderr" ? "stderr" : "stdout"), text: stripAnsi(joined(out.text)) });
    }
    if (type === "error") {
      const tb = (out.traceback || []).map(stripAnsi).join("\n") || (out.ename + ": " + out.evalue);
      return el("pre", { class: "out traceback", text: tb });
    }
    const data = out.data || {};
    for (const kind of ["image/png", "image/jpeg", "image/gif"]) {
      if (data[kind]) {
        return el("img", { class: "out", alt: "image output", src: "data:" + kind + ";base64," + joined(data[kind]).replace(/\s/g, "") });
      }
    }
    if (data["text/html"]) {
      // No allow-scripts, no allow-same-origin: the table shows, nothing in it runs or reads us.
      const frame = el("iframe", { class: "out html", sandbox: "", title: "HTML output" });
      frame.srcdoc = joined(data["text/html"]);
      return frame;
    }
    if (data["text/plain"] !== undefined) return el("pre", { class: "out result", text: stripAnsi(joined(data["text/plain"])) });
    return el("pre", { class: "out muted", text: "(" + Object.keys(data).join(", ") + ")" });
  }

  // A download that carries the token: fetched, then saved from a blob under the name the
  // server gives it (Content-Disposition), as the plain link would be.
  function download(label, path, filename) {
    const a = el("a", { href: path, class: "download", download: filename || "" }, label);
    a.addEventListener("click", async (e) => {
      if (!token()) return;  // the plain link works without a token
      e.preventDefault();
      const resp = await api(path, {}, () => a.click());
      const named = servedName(resp.headers.get("Content-Disposition"));
      saveBlob(await resp.blob(), named || filename || path.split("/").pop());
    });
    return a;
  }

  // The file name of a Content-Disposition header: filename*=utf-8''… first, then filename="…".
  function servedName(header) {
    if (!header) return "";
    const star = /filename\*\s*=\s*[^']*'[^']*'([^;]+)/i.exec(header);
    if (star) {
      try { return decodeURIComponent(star[1].trim()); } catch (_) { /* fall through */ }
    }
    const plain = /filename\s*=\s*"((?:\\.|[^"\\])*)"|filename\s*=\s*([^;]+)/i.exec(header);
    if (!plain) return "";
    return (plain[1] !== undefined ? plain[1].replace(/\\(.)/g, "$1") : plain[2].trim());
  }

  function saveBlob(blob, filename) {
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function textDownload(label, text, filename) {
    const a = el("a", { href: "#", class: "download" }, label);
    a.addEventListener("click", (e) => {
      e.preventDefault();
      saveBlob(new Blob([text], { type: "text/x-python" }), filename);
    });
    return a;
  }

  function seconds(v) { return (Number(v) || 0).toFixed(2) + " s"; }
  function when(iso) { return iso ? String(iso).replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : ""; }

  return { api, askToken, code, download, el, notice, output, Refused, seconds, servedName, stream, stripAnsi, textDownload, token, when };
})();
