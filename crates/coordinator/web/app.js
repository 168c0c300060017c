// The coordinator's dashboard: a map of sharer counts per cell and the QoS
// map's published cells, live share-request figures over server-sent
// events, and the operator's trust state. Everything comes from this
// coordinator; nothing is loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const map = L.map("map", { zoomControl: true, attributionControl: false }).setView([20, 0], 2);
const sharerLayer = L.layerGroup().addTo(map);
const qosLayer = L.layerGroup().addTo(map);
let fitted = false;

function qosColour(c) {
  if (c.weak) return "#d73027";
  if (c.dips_recur) return "#f46d43";
  if (c.kbps < 2000) return "#fdae61";
  return "#1a9850";
}

function latlngs(boundary) {
  return boundary.map(([lat, lon]) => [lat, lon]);
}

async function json(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

async function refreshMap() {
  const m = await json("/api/map");
  $("k").textContent = m.k;
  qosLayer.clearLayers();
  sharerLayer.clearLayers();
  const bounds = [];
  for (const c of m.qos_cells) {
    const p = L.polygon(latlngs(c.boundary), {
      color: qosColour(c), weight: 1, fillOpacity: 0.35,
    }).bindTooltip(`${Math.round(c.kbps)} kbit/s expected, weak ${Math.round(c.weak_share * 100)} % of the time` +
      (c.dip_share == null ? "" : `, a dip on ${Math.round(c.dip_share * 100)} % of passes` +
        (c.dips_recur ? " (warned ahead)" : "")));
    qosLayer.addLayer(p);
    bounds.push(...latlngs(c.boundary));
  }
  for (const c of m.sharer_cells) {
    const p = L.polygon(latlngs(c.boundary), {
      color: "#2f6fdb", weight: 2, fillOpacity: 0.25,
    }).bindTooltip(`${c.count} sharers online`, { permanent: false });
    sharerLayer.addLayer(p);
    bounds.push(...latlngs(c.boundary));
  }
  if (!fitted && bounds.length) {
    map.fitBounds(bounds, { maxZoom: 15 });
    fitted = true;
  }
}

async function refreshTrust() {
  const t = await json("/api/trust");
  $("enroll").textContent = t.enroll;
  $("pending-n").textContent = t.pending.length;
  $("revoked-n").textContent = t.revoked.length;
  const list = (el, rows) => {
    el.replaceChildren(...rows.slice(0, 10).map((d) => {
      const li = document.createElement("li");
      li.textContent = `${d.name || "(unnamed)"} ${d.key} (${d.role || "?"})`;
      return li;
    }));
  };
  list($("pending"), t.pending);
  list($("revoked"), t.revoked);
  $("keys").textContent = t.keys;
}

const history = [];
function spark(v) {
  history.push(v);
  while (history.length > 60) history.shift();
  const c = $("spark");
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const top = Math.max(1, ...history);
  g.strokeStyle = "#2f6fdb";
  g.lineWidth = 2;
  g.beginPath();
  history.forEach((y, i) => {
    const px = (i / 59) * (c.width - 2) + 1;
    const py = c.height - 2 - (y / top) * (c.height - 4);
    if (i === 0) g.moveTo(px, py); else g.lineTo(px, py);
  });
  g.stroke();
}

function live() {
  const es = new EventSource("/events");
  es.onopen = () => { $("conn").textContent = "live"; };
  es.onerror = () => { $("conn").textContent = "reconnecting…"; };
  es.onmessage = (ev) => {
    const s = JSON.parse(ev.data);
    $("version").textContent = "v" + s.version;
    $("online").textContent = s.online_sharers;
    $("rps").textContent = s.live.per_s.toFixed(1);
    $("success").textContent = s.live.success == null ? "–" : Math.round(s.live.success * 100) + " %";
    $("latency").textContent = s.live.p50_ms == null ? "–"
      : `${s.live.p50_ms.toFixed(1)} / ${s.live.p99_ms.toFixed(1)} ms`;
    $("shed").textContent = s.requests_shed;
    spark(s.live.per_s);
  };
}

function every(ms, f) {
  const run = () => f().catch((e) => { $("conn").textContent = String(e.message || e); });
  run();
  setInterval(run, ms);
}

live();
every(5000, refreshMap);
every(10000, refreshTrust);
