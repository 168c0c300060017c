// The requester's page: polls /status once a second and draws what it
// says. Everything comes from this device's own control port.
"use strict";

const $ = (id) => document.getElementById(id);
const rtts = new Map(); // sharer key -> recent RTTs (ms)
const losses = new Map(); // sharer key -> recent loss (%)

function bytes(n) {
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function sparkline(values, fixedTop) {
  const c = document.createElement("canvas");
  c.width = 120; c.height = 28;
  const g = c.getContext("2d");
  const top = fixedTop || Math.max(1, ...values);
  g.strokeStyle = fixedTop ? "#c62828" : "#2f6fdb"; g.lineWidth = 1.5; g.beginPath();
  values.forEach((v, i) => {
    const x = (i / 59) * 118 + 1, y = 27 - (v / top) * 25;
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  const td = document.createElement("td");
  td.appendChild(c);
  return td;
}

function show(s) {
  $("path").textContent = s.path === "direct" ? "over the own link" : "through the pool";
  $("path").className = "big " + (s.path === "direct" ? "ok" : "");
  $("active").textContent = s.active || "–";
  $("why").textContent = s.forecast && s.forecast.acting ? "a weak zone is predicted ahead" : "";
  const o = s.own_link;
  $("own-state").textContent = `${o.state} (via ${o.via})`;
  $("own-state").className = o.state === "degraded" ? "bad" : "ok";
  $("own-rtt").textContent = `${o.rtt_ms == null ? "–" : o.rtt_ms + " ms"} / ${Math.round(o.loss * 100)} %`;
  $("own-hold").textContent = `${o.hold_s} s healthy` + (o.trials ? " and a trial download" : "");
  $("own-trial").textContent = o.last_trial || (o.trials ? "none yet" : "off");
  if (o.forecast_ending) $("why").textContent = "the predicted zone is behind: trying the own link first";
  $("own-bytes").textContent = `${bytes(o.bytes_up)} / ${bytes(o.bytes_down)}`;
  const rows = s.pool.map((m) => {
    const h = rtts.get(m.key) || [];
    h.push(m.rtt_ms);
    while (h.length > 60) h.shift();
    rtts.set(m.key, h);
    const l = losses.get(m.key) || [];
    l.push(m.loss * 100);
    while (l.length > 60) l.shift();
    losses.set(m.key, l);
    const tr = document.createElement("tr");
    tr.append(
      cell((m.active ? "▶ " : "") + m.sharer),
      cell(m.state, m.state === "ready" ? "ok" : "bad"),
      cell(`${m.rtt_ms.toFixed(1)} ms`),
      cell(`${Math.round(m.loss * 100)} %`),
      sparkline(h),
      sparkline(l, 100),
      cell(String(m.flows)),
      cell(bytes(m.bytes_down)),
    );
    return tr;
  });
  $("members").replaceChildren(...rows);
  const f = s.forecast;
  if (f) {
    $("forecast").textContent = f.weak ? "weak zone here" :
      f.weak_in_s == null ? "no weak zone predicted within the horizon" :
      `weak zone in ${Math.round(f.weak_in_s)} s` + (f.acting ? " (acting: new flows through the pool)" : "");
  }
  if (s.failovers.length) {
    $("failovers").replaceChildren(...s.failovers.slice().reverse().slice(0, 10).map((e) => {
      const tr = document.createElement("tr");
      tr.append(
        cell(new Date(e.unix_ms).toLocaleTimeString()),
        cell(`${e.from} → ${e.to || "(none)"}`),
        cell(e.cause),
      );
      return tr;
    }));
  }
}

async function tick() {
  try {
    const r = await fetch("/status");
    if (!r.ok) throw new Error(String(r.status));
    show(await r.json());
    $("conn").textContent = "live";
  } catch (e) {
    $("conn").textContent = "cannot reach the requester: " + (e.message || e);
  }
}

tick();
setInterval(tick, 1000);
