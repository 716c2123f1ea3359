"use strict";
// The bitmote dashboard: polls /v1/dashboard and /v1/pay every second and renders them.

const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const num = (v, digits = 0) => (v == null || Number.isNaN(Number(v)) ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits }));
const short = (h) => (h ? `<code title="${esc(h)}">${esc(String(h).slice(0, 10))}…</code>` : "–");
const time = (ms) => new Date(ms).toLocaleTimeString();

// Replace content only when it changed, so links and buttons stay put between polls.
function html(el, s) {
  if (el._html !== s) {
    el.innerHTML = s;
    el._html = s;
  }
}
function text(id, s) {
  if ($(id).textContent !== String(s)) $(id).textContent = s;
}
function rows(id, items, row, cols, empty) {
  html($(id), items.length ? items.map(row).join("") : `<tr><td colspan="${cols}" class="empty">${esc(empty)}</td></tr>`);
}

// Per-second rate of a growing value over the last `windowMs`.
const samples = new Map();
function rate(key, t, v, windowMs) {
  const s = samples.get(key) || [];
  s.push([t, v]);
  while (s.length > 2 && t - s[0][0] > windowMs) s.shift();
  samples.set(key, s);
  return t > s[0][0] ? ((v - s[0][1]) * 1000) / (t - s[0][0]) : null;
}

function status(msg, cls) {
  text("status", msg);
  $("status").className = cls;
}

function poll(url, render, fail) {
  let busy = false;
  const run = async () => {
    if (busy) return;
    busy = true;
    try {
      const r = await fetch(url, { cache: "no-store" });
      if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
      render(await r.json());
    } catch (e) {
      fail(e);
    } finally {
      busy = false;
    }
  };
  run();
  setInterval(run, 1000);
}

// --- Notary, devices, actuators --------------------------------------------------------

function anchorRow(a) {
  const id = esc(a.reading_id);
  const links = a.reading_id
    ? `<a class="proof" href="/v1/readings/${id}/proof" download="proof-${id}.json">proof</a> ` +
      (a.state === "confirmed" ? `<a class="ots" href="/v1/readings/${id}/proof.ots" download="${id}.ots">.ots</a> ` : "") +
      `<button class="verify" data-id="${id}">verify</button>`
    : "–";
  return `<tr data-state="${esc(a.state)}"><td>${a.id}</td><td>${num(a.tree_size)}</td><td class="${esc(a.state)}">${esc(a.state)}</td>` +
    `<td class="confirmations">${a.confirmations}</td><td>${a.block_height ?? "–"}</td><td>${short(a.confirmed_txid || a.txid)}</td>` +
    `<td>${num(a.fee_sat)}</td><td>${links}</td></tr>`;
}

function deviceRow(d) {
  const p = d.presence;
  const key = !d.id ? "not enrolled" : d.revoked_ms ? `revoked: ${esc(d.revoke_reason)}` : "enrolled";
  return `<tr><td>${esc(d.name)}</td><td>${short(d.id)}</td>` +
    `<td class="${p ? esc(p.state) : "muted"}">${p ? `${esc(p.state)} since ${time(p.since_ms)}` : "–"}</td>` +
    `<td>${d.last_seq ?? "–"}</td><td class="${d.revoked_ms ? "revoked" : ""}">${key}</td></tr>`;
}

function trigger(t) {
  if (t.kind === "payment") return `≥ ${num(t.min_sat)} sat to ${short(t.address)}, ${t.confirmations} conf.`;
  if (t.kind === "height") return `height ${t.height}`;
  if (t.kind === "command") return `command signed by ${short(t.key)}`;
  if (t.kind === "lightning") return `Lightning ${num(t.amount_msat)} msat (invoice valid ${num(t.expiry_secs)} s)`;
  return esc(JSON.stringify(t));
}

const ruleRow = (r) =>
  `<tr><td>${esc(r.id)}</td><td>${esc(r.device)}</td><td>${trigger(r.trigger)}</td><td>${esc(r.command)}</td><td>${esc(r.delivery)}</td><td>${esc(r.source)}</td></tr>`;

const actionRow = (a) =>
  `<tr><td>${short(a.event_id)}</td><td>${esc(a.rule_id)}</td><td>${esc(a.device)}</td><td>${esc(a.command)}</td><td>${a.lightning ? `⚡ ${num(a.lightning.amount_msat)} msat` : a.height}</td>` +
  `<td class="${esc(a.state)}">${esc(a.state)}</td><td>${a.attempts}</td><td>${esc(a.note)}</td></tr>`;

function renderDashboard(d) {
  const r = rate("readings", d.now_ms, d.log.tree_size, 5000);
  text("readings-per-sec", r == null ? "–" : num(r, 1));
  text("tree-size", num(d.log.tree_size));
  text("accepted", num(d.ingest.accepted));
  text("rejected", num(Object.values(d.ingest.rejected).reduce((a, b) => a + b, 0)));
  text("tip-height", num(d.anchors.tip_height));
  text("checkpoint", d.log.checkpoint);
  text("anchor-status", `anchoring: ${d.anchors.status}`);
  rows("anchors", d.anchors.anchors, anchorRow, 8, "no anchors yet");
  rows("devices", d.devices, deviceRow, 5, "no devices");
  if (d.rules) rows("rules", d.rules, ruleRow, 6, "no rules");
  rows("actions", d.actions, actionRow, 8, "no actions yet");
  html($("alerts"), d.alerts.map((a) => `<li>${esc(a)}</li>`).join(""));
  status(`live · ${time(d.now_ms)}`, "ok");
}

async function verify(id) {
  const box = $("verify-result");
  box.hidden = false;
  delete box.dataset.result;
  box.innerHTML = `Verifying reading ${short(id)}…`;
  try {
    const r = await fetch(`/v1/readings/${id}/verify`, { method: "POST" });
    const v = await r.json();
    if (!r.ok) throw new Error(v.error || `HTTP ${r.status}`);
    const ok = v.verified;
    const head = ok
      ? `✓ verified: reading ${short(id)}, leaf ${ok.leaf_index} of ${ok.tree_size}, anchored in block ${ok.block_height} ` +
        `(${short(ok.block_hash)}), existed by ${new Date(ok.block_time * 1000).toISOString()}`
      : `${v.result === "pending" ? "… pending" : "✗ failed"}: ${esc(v.error)}`;
    const steps = v.steps.map((s) => `<li class="${esc(s.result)}">${esc(s.name)}: ${esc(s.result)}${s.detail ? ` — ${esc(s.detail)}` : ""}</li>`);
    const o = v.ots;
    const ots = `.ots file: ${esc(o.result)}${o.block_height != null ? ` (attested by block ${o.block_height})` : ""}${o.detail ? ` — ${esc(o.detail)}` : ""}`;
    box.innerHTML = `<b class="${ok ? "ok" : esc(v.result)}">${head}</b><ol>${steps.join("")}</ol><p class="${esc(o.result)}">${ots}</p>`;
    box.dataset.result = v.result;
  } catch (e) {
    box.innerHTML = `<b class="error">${esc(e.message)}</b>`;
    box.dataset.result = "error";
  }
}

$("anchors").addEventListener("click", (e) => {
  const b = e.target.closest("button.verify");
  if (b) verify(b.dataset.id);
});

// --- Lightning -------------------------------------------------------------------------

const history = []; // { t, power, paid }

function sourceLine(s) {
  if (s.error) return `<p class="error" title="${esc(s.url)}">${esc(s.error)}</p>`;
  const st = s.status;
  const n = st.node || {};
  const meter = st.role === "meter" ? ` · <b>${num(st.power_w)} W</b>, register ${num(st.register_mwh / 1000, 3)} Wh` : "";
  // What a hub charged the meter for routing, over the node's life (0 when ticks of a few
  // tens of msat meet a proportional fee: LDK rounds each forward's fee down).
  const fees = st.role === "meter" && n.routing_fees_paid_msat != null ? ` · routing fees ${num(n.routing_fees_paid_msat / 1000, 3)} sat` : "";
  return `<p><b>${esc(st.role)}</b> ${esc(s.url)} · node ${short(n.node_id)} · on-chain ${num(n.onchain_sat)} sat · ` +
    `Lightning ${num(n.lightning_sat)} sat · ${(n.channels || []).length} channel(s)${fees}${meter}</p>`;
}

const sessionRow = ({ role, power, s, r }) =>
  `<tr><td>${esc(role)}</td><td>${short(s.id)}</td><td>${esc(s.tariff.mode)}</td><td class="${esc(s.state)}">${esc(s.state)}${s.supply ? " · supplying" : ""}</td>` +
  `<td>${num(power)}</td><td>${num(s.energy_wh, 3)}</td><td>${num(s.tariff.price_msat_per_wh)}</td><td>${r == null ? "–" : num(r, 3)}</td>` +
  `<td>${num(s.account.ticks)}</td><td>${num(s.account.paid_msat / 1000, 3)}</td>` +
  `<td>${num(s.due_msat)}</td><td>${num(s.credit_msat)}</td><td>${s.late} / ${s.short}</td></tr>`;

function renderPay(p) {
  const t = Date.now();
  if (!p.sources.length) {
    html($("pay-sources"), `<p class="empty">No Lightning meter or provider configured (<code>pay_status_urls</code>).</p>`);
  } else {
    html($("pay-sources"), p.sources.map(sourceLine).join(""));
  }
  const sessions = [];
  const paid = { meter: 0, provider: 0 };
  let power = 0;
  let meters = 0;
  for (const src of p.sources) {
    const st = src.status;
    if (!st) continue;
    if (st.role === "meter") {
      power += st.power_w || 0;
      meters += 1;
    }
    for (const s of st.sessions || []) {
      const sat = s.account.paid_msat / 1000;
      paid[st.role] = (paid[st.role] || 0) + sat;
      sessions.push({ role: st.role, power: st.role === "meter" ? st.power_w : null, s, r: rate(`${src.url} ${s.id}`, t, sat, 10000) });
    }
  }
  // The meter's and the provider's account of one session side by side.
  sessions.sort((a, b) => (a.s.id < b.s.id ? -1 : a.s.id > b.s.id ? 1 : a.role.localeCompare(b.role)));
  rows("sessions", sessions, sessionRow, 14, "no sessions");
  if (p.sources.some((s) => s.status)) {
    history.push({ t, power, paid: meters ? paid.meter : paid.provider });
    if (history.length > 300) history.shift();
  }
  plot();
}

function plot() {
  const c = $("plot");
  const g = c.getContext("2d");
  const [W, H, pad] = [c.width, c.height, 12];
  g.clearRect(0, 0, W, H);
  g.strokeStyle = "#ccc";
  g.strokeRect(pad, pad, W - 2 * pad, H - 2 * pad);
  if (history.length < 2) return;
  const t0 = history[0].t;
  const span = Math.max(1, history[history.length - 1].t - t0);
  const line = (key, color) => {
    const max = Math.max(...history.map((h) => h[key]));
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    history.forEach((h, i) => {
      const x = pad + ((W - 2 * pad) * (h.t - t0)) / span;
      const y = H - pad - ((H - 2 * pad) * h[key]) / (max || 1);
      if (i) g.lineTo(x, y);
      else g.moveTo(x, y);
    });
    g.stroke();
    return max;
  };
  const pmax = line("power", "#d9822b");
  const smax = line("paid", "#2b6cd9");
  text("plot-scale", `top: ${num(pmax)} W, ${num(smax, 3)} sat · last ${Math.round(span / 1000)} s`);
}

poll("/v1/dashboard", renderDashboard, (e) => status(`gateway unreachable (${e.message})`, "error"));
poll("/v1/pay", renderPay, (e) => html($("pay-sources"), `<p class="error">${esc(e.message)}</p>`));
