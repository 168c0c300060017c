//! The sharer's stream to the coordinator: hello, welcome, then reports,
//! pings, access requests answered by the consent policy, ticket keys and
//! revocations; reconnected with backoff until a refusal that retrying
//! cannot change.

use super::consent;
use super::daily::store_daily_used;
use super::meter::LinkMeter;
use super::{SharerOptions, Unacked, uplink};
use crate::location::LocationSpec;
use crate::probe::PingTracker;
use crate::{AgentError, Shutdown, client};
use bandshare_core::{Backoff, LinkState};
use bandshare_proto::convert as cv;
use bandshare_proto::v1::{self, coordinator_message::Msg as Down, sharer_message::Msg as Up};
use bandshare_relay::RelayHandle;
use ed25519_dalek::SigningKey;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, error, info, warn};

/// What every session of the stream loop works with.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) opts: &'a SharerOptions,
    pub(super) url: &'a crate::client::ServerUrl,
    pub(super) key: &'a SigningKey,
    pub(super) advertise: SocketAddr,
    pub(super) relay: &'a RelayHandle,
    pub(super) unacked: &'a Unacked,
}

pub(super) async fn stream_loop(
    ctx: Ctx<'_>,
    mut location: watch::Receiver<LocationSpec>,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let opts = ctx.opts;
    // The coordinator places sharers by a fix: wait for the first one.
    if location.borrow().at.is_none() {
        info!("waiting for a position fix");
        tokio::select! {
            r = location.wait_for(|l| l.at.is_some()) => if r.is_err() { return Ok(()) },
            _ = shutdown.clone().wait() => return Ok(()),
        }
    }
    let mut backoff = Backoff::default();
    let mut meter = LinkMeter {
        iface: uplink::uplink_interface(opts.uplink.as_deref()),
        power_supply: opts.power_supply.clone(),
        last: None,
        cap_bps: opts.bandwidth_bps,
        network: opts.network,
    };
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(ctx, &mut meter, &mut location) => r,
            _ = shutdown.clone().wait() => return Ok(()),
        };
        match result {
            Err(AgentError::Refused(reason)) => {
                error!(%reason, "the coordinator refused this sharer; stopping");
                return Err(AgentError::Refused(reason));
            }
            Err(e) => warn!(error = %e, "coordinator stream lost"),
            Ok(()) => {}
        }
        // A session that lasted a while was a success: start backoff over.
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let delay = backoff.next_delay(fastrand::f64());
        info!(
            retry_in_ms = delay.as_millis() as u64,
            "reconnecting to coordinator"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.clone().wait() => return Ok(()),
        }
    }
}

/// Resolves when the location changed, no sooner than 250 ms after the last
/// report. A static location (no live source) never changes: never resolves.
async fn moved(location: &mut watch::Receiver<LocationSpec>, last_report: &Instant) {
    if location.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    let since = last_report.elapsed();
    if since < Duration::from_millis(250) {
        tokio::time::sleep(Duration::from_millis(250) - since).await;
    }
}

/// The 32-byte keys of a list, others skipped.
fn keys_of(list: &[Vec<u8>]) -> Vec<[u8; 32]> {
    list.iter()
        .filter_map(|k| k.as_slice().try_into().ok())
        .collect()
}

/// This sharer's MAC keys, opened with its device key; one that does not
/// open is logged and skipped (its v2 tickets are then refused).
fn mac_keys_of(list: &[v1::SealedTicketKey], me: &SigningKey) -> Vec<(u8, [u8; 32])> {
    list.iter()
        .filter_map(|k| {
            let sealed = bandshare_core::SealedMacKey {
                key_id: u8::try_from(k.key_id).ok()?,
                ephemeral: k.ephemeral.as_slice().try_into().ok()?,
                sealed: k.sealed.as_slice().try_into().ok()?,
                check: k.check.as_slice().try_into().ok()?,
            };
            sealed
                .open(me)
                .map(|key| (sealed.key_id, key))
                .map_err(|e| warn!(error = %e, "coordinator's ticket key skipped"))
                .ok()
        })
        .collect()
}

fn devices_of(list: &[Vec<u8>]) -> Vec<bandshare_core::DeviceKey> {
    keys_of(list)
        .into_iter()
        .map(bandshare_core::DeviceKey)
        .collect()
}

/// The first message of a session: who this sharer is and what it offers.
fn hello(
    ctx: Ctx<'_>,
    link: &LinkState,
    location: &mut watch::Receiver<LocationSpec>,
) -> v1::Hello {
    let Ctx {
        opts,
        key,
        advertise,
        relay,
        ..
    } = ctx;
    v1::Hello {
        version: 1,
        name: opts.name.clone(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        services: cv::services_to_wire(opts.services),
        network: cv::network_to_wire(opts.network),
        security: cv::security_to_wire(opts.security),
        relay_endpoints: vec![advertise.to_string()],
        relay_cert_sha256: relay.cert_pin().to_vec(),
        consent: Some(v1::ConsentPolicy {
            accept: opts.consent.accept,
            max_requesters: opts.consent.max_requesters,
        }),
        location: Some(location.borrow_and_update().to_wire()),
        link: Some(cv::link_to_wire(link)),
    }
}

/// The consent policy's answer to one access request, with the link as
/// measured now.
fn answer(ctx: Ctx<'_>, a: &v1::AccessRequest, link: &LinkState) -> v1::AccessResponse {
    let Ctx {
        opts,
        advertise,
        relay,
        ..
    } = ctx;
    let requester = bandshare_core::DeviceKey::from_slice(&a.requester_key).ok();
    let decision = opts.consent.decide(&consent::Moment {
        active_requesters: relay.active_requesters(),
        minute_of_day: consent::local_minute_of_day(),
        battery_pct: uplink::battery_pct(&opts.power_supply),
        wanted: a
            .conditions
            .as_ref()
            .map(|c| cv::services_from_wire(&c.services))
            .unwrap_or_default(),
        daily_left: relay.daily_left(),
        requester_left: requester.map_or(0, |k| relay.requester_left(&k)),
    });
    if let Err(reason) = &decision {
        info!(request = a.request_id, %reason, "declined an access request");
    }
    debug!(
        request = a.request_id,
        accept = decision.is_ok(),
        "access request"
    );
    v1::AccessResponse {
        request_id: a.request_id,
        accept: decision.is_ok(),
        reason: decision.err().map(|d| d.to_string()).unwrap_or_default(),
        relay_endpoints: vec![advertise.to_string()],
        services: cv::services_to_wire(opts.services),
        link: Some(cv::link_to_wire(link)),
    }
}

/// A state report: where the sharer is, its link, and the usage batches
/// not yet acknowledged (today's new usage joins them first).
fn report(
    ctx: Ctx<'_>,
    link: &LinkState,
    location: &mut watch::Receiver<LocationSpec>,
) -> v1::StateReport {
    let Ctx {
        opts,
        relay,
        unacked,
        ..
    } = ctx;
    if let Some(dir) = &opts.data_dir {
        store_daily_used(dir, relay.daily_used());
    }
    let usage: Vec<v1::Usage> = relay
        .take_usage()
        .into_iter()
        .map(|u| v1::Usage {
            requester_key: u.requester.0.to_vec(),
            bytes_up: u.bytes_up,
            bytes_down: u.bytes_down,
            flows: u.flows,
        })
        .collect();
    if !usage.is_empty() {
        unacked.push(usage);
    }
    v1::StateReport {
        location: Some(location.borrow_and_update().to_wire()),
        link: Some(cv::link_to_wire(link)),
        active_requesters: relay.active_requesters(),
        batches: unacked.to_send(),
    }
}

fn up(msg: Up) -> v1::SharerMessage {
    v1::SharerMessage { msg: Some(msg) }
}

/// A status from the coordinator as an error: refusals that retrying
/// cannot change end the sharer; anything else is retried.
fn stream_error(context: &str, s: &tonic::Status) -> AgentError {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::AlreadyExists => {
            AgentError::Refused(s.message().to_string())
        }
        _ => AgentError::Stream(format!("{context}: {}", s.message())),
    }
}

/// One stream to the coordinator, until it breaks.
async fn session(
    ctx: Ctx<'_>,
    meter: &mut LinkMeter,
    location: &mut watch::Receiver<LocationSpec>,
) -> Result<(), AgentError> {
    let Ctx {
        url,
        relay,
        unacked,
        ..
    } = ctx;
    let channel = client::connect(url).await?;
    let mut client = v1::sharer_link_client::SharerLinkClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    let mut probe = PingTracker::new(Duration::from_secs(2));
    let link = meter.measure(&probe, relay, Instant::now());
    let hello = hello(ctx, &link, location);
    tx.send(up(Up::Hello(hello)))
        .await
        .map_err(|_| AgentError::Stream("closed".into()))?;
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .map_err(|s| stream_error("coordinator refused the stream", &s))?
        .into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(v1::CoordinatorMessage {
            msg: Some(Down::Welcome(w)),
        })) => w,
        Ok(_) => return Err(AgentError::Stream("coordinator sent no welcome".into())),
        Err(s) => return Err(stream_error("coordinator", &s)),
    };
    let keys = keys_of(&welcome.coordinator_keys);
    if keys.is_empty() {
        return Err(AgentError::Stream(
            "coordinator sent no 32-byte ticket key".into(),
        ));
    }
    relay.set_coordinator_keys(&keys, &mac_keys_of(&welcome.ticket_mac_keys, ctx.key));
    relay.revoke(&devices_of(&welcome.revoked));
    let interval = |ms: u32, default: u64| {
        Duration::from_millis(if ms == 0 {
            default
        } else {
            ms.clamp(50, 60_000) as u64
        })
    };
    let ping_every = interval(welcome.ping_interval_ms, 1000);
    probe = PingTracker::new((ping_every * 2).max(Duration::from_millis(500)));
    let mut ping_tick = tokio::time::interval(ping_every);
    let mut report_tick = tokio::time::interval(interval(welcome.report_interval_ms, 2000));
    info!("online at coordinator");
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(AgentError::Stream("coordinator ended it".into())),
                    Err(s) => return Err(stream_error("coordinator", &s)),
                };
                match msg.msg {
                    Some(Down::Pong(p)) => probe.pong(p.seq, Instant::now()),
                    Some(Down::UsageAck(a)) => unacked.ack(&a.batch_ids),
                    Some(Down::TicketKeys(k)) => {
                        let keys = keys_of(&k.keys);
                        if !keys.is_empty() {
                            info!(keys = keys.len(), "coordinator ticket keys changed");
                            relay.set_coordinator_keys(&keys, &mac_keys_of(&k.mac_keys, ctx.key));
                        }
                    }
                    Some(Down::Revoked(r)) => relay.revoke(&devices_of(&r.keys)),
                    Some(Down::AccessRequest(a)) => {
                        let link = meter.measure(&probe, relay, Instant::now());
                        let _ = tx.try_send(up(Up::AccessResponse(answer(ctx, &a, &link))));
                    }
                    _ => {}
                }
            }
            _ = ping_tick.tick() => {
                let seq = probe.ping(Instant::now());
                let _ = tx.try_send(up(Up::Ping(v1::Ping { seq })));
            }
            // A move is reported at once (at most every 250 ms), so the
            // coordinator's index follows the device.
            _ = moved(location, &last_report) => report_tick.reset_immediately(),
            _ = report_tick.tick() => {
                last_report = Instant::now();
                let link = meter.measure(&probe, relay, Instant::now());
                let report = report(ctx, &link, location);
                if tx.send(up(Up::Report(report))).await.is_err() {
                    return Err(AgentError::Stream("closed".into()));
                }
            }
        }
    }
}
