//! `SharerLink.Attach`: one long-lived stream per online sharer. Hello puts
//! it in the registry, reports move it, pings are echoed so the sharer can
//! measure RTT and loss, access responses go to the waiting share request.
//! The stream ending takes the sharer offline at once.

use crate::registry::{Handle, Route};
use crate::{State, unix_now};
use bandshare_core::DeviceKey;
use bandshare_matcher::SharerInfo;
use bandshare_proto::convert as cv;
use bandshare_proto::v1::{self, coordinator_message::Msg as Down, sharer_message::Msg as Up};
use bandshare_store::{Role, UsageRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

pub struct SharerLinkService {
    pub(crate) state: Arc<State>,
}

fn down(msg: Down) -> Result<v1::CoordinatorMessage, Status> {
    Ok(v1::CoordinatorMessage { msg: Some(msg) })
}

/// Reads what matching needs from a hello, or says what is wrong with it.
fn sharer_info(h: &v1::Hello) -> Result<SharerInfo, Status> {
    let loc = h.location.as_ref();
    let ev = crate::evidence::evidence(&loc.cloned().unwrap_or_default())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let position = ev.fix.ok_or_else(|| {
        Status::invalid_argument("hello needs a location with a GNSS fix (--at is the fallback)")
    })?;
    bandshare_core::name::check_name(&h.name)
        .map_err(|e| Status::invalid_argument(format!("sharer name refused: {e}")))?;
    if h.relay_endpoints.is_empty() {
        return Err(Status::invalid_argument("hello names no relay endpoint"));
    }
    let consent = h.consent.unwrap_or(v1::ConsentPolicy {
        accept: true,
        max_requesters: 0,
    });
    let mut link = h.link.as_ref().map(cv::link_from_wire).unwrap_or_default();
    link.network = cv::network_from_wire(h.network);
    Ok(SharerInfo {
        name: h.name.as_str().into(),
        position,
        exact: position,
        heading_deg: ev.heading_deg,
        speed_mps: ev.speed_mps,
        services: cv::services_from_wire(&h.services),
        network: cv::network_from_wire(h.network),
        security: cv::security_from_wire(h.security),
        link,
        accepting: consent.accept,
        active_requesters: 0,
        max_requesters: consent.max_requesters,
        fingerprint: ev.wifi,
        cell: ev.cell,
        router: ev.router,
    })
}

#[tonic::async_trait]
impl v1::sharer_link_server::SharerLink for SharerLinkService {
    type AttachStream = ReceiverStream<Result<v1::CoordinatorMessage, Status>>;

    async fn attach(
        &self,
        req: Request<Streaming<v1::SharerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(v1::SharerMessage {
            msg: Some(Up::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        let key = DeviceKey::from_slice(&hello.public_key)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if hello.relay_cert_sha256.len() != 32 {
            return Err(Status::invalid_argument(
                "relay_cert_sha256 must be 32 bytes",
            ));
        }
        let mut info = sharer_info(&hello)?;
        let name = hello.name.clone();
        let state = self.state.clone();
        // Held until the sharer is in the index: a storm of hellos is
        // admitted a few at a time, in order.
        let turn = state.join_turn().await?;
        admit(&state, key, &name).await?;
        // Shown at its secret offset point, for every requester alike.
        let mut placement = crate::privacy::Placement::default();
        info.position = placement.shown(state.offsets(), &key, info.exact, unix_now());
        let cfg = state.config();
        let (tx, rx) = mpsc::channel(64);
        tx.send(down(Down::Welcome(v1::Welcome {
            report_interval_ms: cfg.report_interval.as_millis() as u32,
            ping_interval_ms: cfg.ping_interval.as_millis() as u32,
            coordinator_keys: state.ticket_keys(),
            revoked: state.revoked(),
            ticket_mac_keys: state.ticket_mac_keys(&key),
        })))
        .await
        .map_err(|_| Status::unavailable("stream closed"))?;
        let handle = Handle {
            key,
            relay_endpoints: hello.relay_endpoints.clone(),
            relay_cert_sha256: hello.relay_cert_sha256.clone(),
            route: Route::Local(tx.clone()),
            generation: 0,
            last_seen: Instant::now(),
            mac_key: Default::default(),
        };
        let (id, generation) = state.registry().add(info, handle);
        drop(turn);
        if let Some(c) = state.cluster() {
            c.changed(&state, &key);
        }
        info!(sharer = %name, key = %key.short(), online = state.registry().len(), "sharer online");
        state.note_device(key, name.clone(), Role::Sharer);
        let span = info_span!("sharer_stream", sharer = %name);
        let stream = Stream {
            id,
            generation,
            key,
            placement,
        };
        tokio::spawn(follow(state, inbound, stream, tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Lets a sharer in: not revoked, approved when approval is required
/// (refusals are recorded so an operator sees them), and the owner of its
/// name (a name belongs to the first admitted device that used it).
async fn admit(state: &Arc<State>, key: DeviceKey, name: &str) -> Result<(), Status> {
    if let Err(denied) = state.check_device(&key) {
        // Recorded, so an operator sees it in `bandshare admin list`.
        state
            .record_device(key, name.to_string(), Role::Sharer)
            .await;
        info!(sharer = ?name, key = %key.short(), reason = denied.message(), "sharer refused");
        return Err(denied);
    }
    // A name belongs to the first admitted device that used it.
    let bound = state
        .bind_name(name, key)
        .await
        .map_err(|e| {
            Status::unavailable(format!(
                "cannot bind the sharer's name now ({e}); the service's store is unreachable, retrying is safe"
            ))
        })?;
    if let Err(owner) = bound {
        info!(sharer = %name, key = %key.short(), owner = %owner.short(), "sharer refused: name taken");
        return Err(Status::already_exists(format!(
            "the name {name:?} belongs to another device (key {}…); choose another --name",
            owner.short()
        )));
    }
    Ok(())
}

/// Reads one sharer's stream until it ends: pings, reports (with usage
/// batches for the ledger) and answers to access requests; then takes the
/// sharer offline unless a newer stream replaced it.
async fn follow(
    state: Arc<State>,
    mut inbound: Streaming<v1::SharerMessage>,
    mut stream: Stream,
    tx: mpsc::Sender<Result<v1::CoordinatorMessage, Status>>,
) {
    let (id, generation, key) = (stream.id, stream.generation, stream.key);
    let registry = &state.registry();
    let why = loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break "stream ended".to_string(),
            Err(e) => break format!("stream error: {}", e.message()),
        };
        let now = Instant::now();
        match msg.msg {
            Some(Up::Ping(p)) => {
                registry.touch(id, generation, now);
                if let Some(c) = state.cluster() {
                    c.refresh(&state, &key);
                }
                let _ = tx.try_send(down(Down::Pong(v1::Pong { seq: p.seq })));
            }
            Some(Up::Report(mut r)) => {
                state.count_report();
                let batches = std::mem::take(&mut r.batches);
                apply_report(&state, &mut stream, r, now);
                if !batches.is_empty() {
                    tokio::spawn(record_batches(state.clone(), key, batches, tx.clone()));
                }
            }
            Some(Up::AccessResponse(a)) => {
                registry.touch(id, generation, now);
                registry.answer(id, generation, a);
            }
            Some(Up::Hello(_)) | None => {
                break "protocol error: unexpected message".to_string();
            }
        }
    };
    if registry.remove(id, generation).is_some() {
        if let Some(c) = state.cluster() {
            c.gone(&key);
        }
        info!(reason = %why, online = registry.len(), "sharer offline");
    }
}

/// Writes usage batches to the ledger, then acknowledges the ones that are
/// durable; a batch seen before is acknowledged without counting it again.
async fn record_batches(
    state: Arc<State>,
    sharer: DeviceKey,
    batches: Vec<v1::UsageBatch>,
    tx: mpsc::Sender<Result<v1::CoordinatorMessage, Status>>,
) {
    let mut acked = vec![];
    for b in batches.into_iter().take(MAX_BATCHES_PER_REPORT) {
        let rows = usage_rows(sharer, &b.usage);
        let bytes = rows.iter().map(|r| r.bytes_up + r.bytes_down).sum();
        match state.record_usage_batch(sharer, b.id, rows).await {
            Ok(fresh) => {
                if fresh {
                    state.metrics().usage_acknowledged(bytes);
                }
                acked.push(b.id)
            }
            Err(e) => {
                // Not acknowledged: the sharer sends it again.
                warn!(error = %e, "cannot record usage");
                break;
            }
        }
    }
    if !acked.is_empty() {
        let _ = tx
            .send(down(Down::UsageAck(v1::UsageAck { batch_ids: acked })))
            .await;
    }
}

/// Batches recorded from one report at most; the rest wait for the next.
const MAX_BATCHES_PER_REPORT: usize = 64;

fn usage_rows(sharer: DeviceKey, usage: &[v1::Usage]) -> Vec<UsageRecord> {
    usage
        .iter()
        .filter_map(|u| {
            Some(UsageRecord {
                sharer,
                requester: DeviceKey::from_slice(&u.requester_key).ok()?,
                bytes_up: u.bytes_up,
                bytes_down: u.bytes_down,
                flows: u.flows,
            })
        })
        .collect()
}

/// One sharer's stream, as [`follow`] keeps it.
struct Stream {
    id: bandshare_matcher::SharerId,
    generation: u64,
    key: DeviceKey,
    /// Where it is shown (its secret offset, kept while it stays put).
    placement: crate::privacy::Placement,
}

fn apply_report(state: &Arc<State>, s: &mut Stream, r: v1::StateReport, now: Instant) {
    // A report with a bad location keeps the last good one.
    let ev = r
        .location
        .as_ref()
        .and_then(|l| crate::evidence::evidence(l).ok());
    let shown = ev
        .as_ref()
        .and_then(|e| e.fix)
        .map(|p| (p, s.placement.shown(state.offsets(), &s.key, p, unix_now())));
    state.registry().update(s.id, s.generation, now, |info| {
        if let Some((exact, shown)) = shown {
            info.exact = exact;
            info.position = shown;
        }
        if let Some(ev) = ev {
            // Velocity and radio evidence describe now: absent means unknown.
            info.heading_deg = ev.heading_deg;
            info.speed_mps = ev.speed_mps;
            info.fingerprint = ev.wifi;
            info.cell = ev.cell;
            info.router = ev.router;
        }
        if let Some(l) = &r.link {
            let network = info.network;
            info.link = cv::link_from_wire(l);
            info.link.network = network;
        }
        info.active_requesters = r.active_requesters;
    });
    if let Some(c) = state.cluster() {
        c.changed(state, &s.key);
    }
    // Its uplink as it measured it, where it truly is, into the QoS map.
    if let (Some((exact, _)), Some(l)) = (shown, &r.link) {
        crate::qos::sharer_uplink(state, &s.key, exact, l);
    }
}
