//! `Matchmaker.RequestShare`: decide the scene, rank candidates, push access
//! requests to the top M over their streams with a deadline, and turn the
//! acceptances into offers with tickets, best first. Offers carry a
//! distance band, never coordinates.

use crate::offer;
use crate::registry::{self, Contact};
use crate::{State, unix_now};
use bandshare_core::DeviceKey;
use bandshare_matcher::{MatchConfig, Query};
use bandshare_proto::convert as cv;
use bandshare_proto::v1;
use bandshare_store::Role;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span};

pub struct MatchmakerService {
    pub(crate) state: Arc<State>,
}

async fn ask(
    state: &State,
    c: &Contact,
    requester: &DeviceKey,
    conditions: &v1::Conditions,
    band: &str,
) -> offer::Answer {
    let deadline = state.config().access_deadline;
    let req = v1::AccessRequest {
        request_id: 0,
        requester_key: requester.0.to_vec(),
        conditions: Some(conditions.clone()),
        distance_band: band.to_string(),
        deadline_ms: deadline.as_millis() as u32,
    };
    let resp = match &c.handle.route {
        // Bounded by the fan-out's one deadline (see `fan_out`).
        registry::Route::Local(tx) => state.registry().ask_local_waiting(c, tx, req).await,
        // Its stream is on another coordinator: routed through Redis.
        registry::Route::Remote { owner, .. } => match state.cluster() {
            Some(cl) => cl.ask(owner, &c.handle.key, req, deadline).await,
            None => None,
        },
    };
    match resp {
        Some(resp) if resp.accept => offer::Answer::Accepted(resp),
        Some(resp) => offer::Answer::Declined(resp.reason),
        None => offer::Answer::Silent,
    }
}

/// Asks every contact at once and collects their answers, in the
/// contacts' order, until all have answered or the access deadline has
/// passed: one timer for the whole fan-out, not one per ask. Those still
/// waiting then are silent (their pending asks are forgotten as their
/// futures drop).
async fn fan_out(
    state: &State,
    contacts: &[Contact],
    candidates: &[bandshare_matcher::Candidate],
    requester: &DeviceKey,
    conditions: &v1::Conditions,
) -> Vec<offer::Answer> {
    use futures::StreamExt;
    let mut answers: Vec<Option<offer::Answer>> = contacts.iter().map(|_| None).collect();
    let mut asks: futures::stream::FuturesUnordered<_> = contacts
        .iter()
        .zip(candidates)
        .enumerate()
        .map(|(i, (c, cand))| async move {
            (
                i,
                ask(state, c, requester, conditions, cand.band.as_str()).await,
            )
        })
        .collect();
    let deadline = tokio::time::sleep(state.config().access_deadline);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = asks.next() => match next {
                Some((i, a)) => answers[i] = Some(a),
                None => break,
            },
            () = &mut deadline => break,
        }
    }
    drop(asks);
    answers
        .into_iter()
        .map(|a| {
            let a = a.unwrap_or(offer::Answer::Silent);
            state.metrics().access_answer(match a {
                offer::Answer::Accepted(_) => "accepted",
                offer::Answer::Declined(_) => "declined",
                offer::Answer::Silent => "silent",
            });
            a
        })
        .collect()
}

/// A ticket nonce: unique, which is all a nonce must be (the relay's
/// replay cache keys on it; the ticket's MAC or signature covers it):
/// HMAC of a counter under a key drawn once per process, so there is no
/// system call per ticket and a nonce does not tell how many came before.
fn ticket_nonce() -> [u8; 16] {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEY: OnceLock<ring::hmac::Key> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k).is_err() {
            // Never expected; nonces only need to be unique.
            k[..16].copy_from_slice(&fastrand::u128(..).to_be_bytes());
        }
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)
    });
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag = ring::hmac::sign(key, &count.to_be_bytes());
    let mut n = [0u8; 16];
    n.copy_from_slice(&tag.as_ref()[..16]);
    n
}

/// Admits a request by its rate and plausibility, then decides its scene
/// once. Sharers are shown (and indexed) at their secret offset points: a
/// search from a position reaches the offset's maximum further (the
/// margin), so no sharer really inside the region is missed.
fn place(
    state: &State,
    requester: &DeviceKey,
    evidence: &bandshare_matcher::Evidence,
) -> Result<(bandshare_matcher::SceneDecision, f64), Status> {
    let now = std::time::Instant::now();
    state.privacy(|guard| {
        guard
            .admit(requester, evidence.fix, now)
            .map_err(|r| match r {
                crate::privacy::Refusal::RateLimited { .. } => {
                    Status::resource_exhausted(r.to_string())
                }
                crate::privacy::Refusal::Implausible { .. } => {
                    Status::failed_precondition(r.to_string())
                }
            })?;
        let scene = bandshare_matcher::decide_scene(evidence, &state.config().region)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let margin = match evidence.fix {
            Some(_) => state.config().privacy.fuzz_max_m,
            None => 0.0,
        };
        Ok((scene, margin))
    })?
}

/// Records a requester in the store the first time it is seen since start
/// (so operators can list and approve it).
fn record_requester(
    state: &Arc<State>,
    requester: DeviceKey,
) -> Option<tokio::task::JoinHandle<()>> {
    if !state.first_sight(&requester) {
        return None;
    }
    let state = state.clone();
    Some(tokio::spawn(async move {
        state
            .record_device(requester, "requester".into(), Role::Requester)
            .await
    }))
}

#[tonic::async_trait]
impl v1::matchmaker_server::Matchmaker for MatchmakerService {
    async fn refresh_tickets(
        &self,
        req: Request<v1::TicketRefresh>,
    ) -> Result<Response<v1::ShareResponse>, Status> {
        let _permit = self.state.admit_request()?;
        let req = req.into_inner();
        let state = &self.state;
        let requester = proven(
            &self.state,
            &req.requester_key,
            &req.proof,
            req.signed_at_unix,
        )
        .await?;
        if req.sharer_keys.len() > 16 {
            return Err(Status::invalid_argument(
                "at most 16 sharer keys per refresh",
            ));
        }
        state
            .privacy(|g| g.admit(&requester, None, std::time::Instant::now()))?
            .map_err(|r| Status::resource_exhausted(r.to_string()))?;
        let allowed = state.offered_by_service(&requester).await;
        let contacts: Vec<Contact> = req
            .sharer_keys
            .iter()
            .filter_map(|k| DeviceKey::from_slice(k).ok())
            .filter(|k| allowed.contains(k))
            .filter_map(|k| state.registry().contact_of(&k))
            .collect();
        let terms = offer::Terms::new(state.config(), &v1::Conditions::default(), unix_now());
        let offers = offer::refreshed(&contacts, &terms, &state.signer(), requester, ticket_nonce);
        state.metrics().tickets_refreshed(offers.len());
        debug!(
            asked = req.sharer_keys.len(),
            refreshed = offers.len(),
            "tickets refreshed"
        );
        Ok(Response::new(v1::ShareResponse {
            offers,
            ..Default::default()
        }))
    }

    async fn request_share(
        &self,
        req: Request<v1::ShareRequest>,
    ) -> Result<Response<v1::ShareResponse>, Status> {
        let started = std::time::Instant::now();
        let answer = async {
            let _permit = self.state.admit_request()?;
            let req = req.into_inner();
            let requester = proven(
                &self.state,
                &req.requester_key,
                &req.proof,
                req.signed_at_unix,
            )
            .await?;
            let span = info_span!("share_request", requester = %requester.short());
            self.handle(req, requester).instrument(span).await
        }
        .await;
        self.state.metrics().share_request(
            answer
                .as_ref()
                .map(|r| r.get_ref().offers.len())
                .map_err(|s| s.code()),
            started.elapsed(),
        );
        answer
    }
}

/// The requester a request names, once it has proven holding the key
/// and is allowed in (enrolled, not revoked).
pub(crate) async fn proven(
    state: &Arc<State>,
    key: &[u8],
    proof: &[u8],
    signed_at_unix: u64,
) -> Result<DeviceKey, Status> {
    let requester = DeviceKey::from_slice(key)
        .map_err(|e| Status::invalid_argument(format!("requester_key: {e}")))?;
    state
        .verify_proof(&requester, proof, signed_at_unix)
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    enrolled(state, &requester).await?;
    Ok(requester)
}

/// Refuses a revoked or (in approval mode) unapproved requester; the
/// latter is recorded so the operator can approve it.
async fn enrolled(state: &Arc<State>, requester: &DeviceKey) -> Result<(), Status> {
    let Err(denied) = state.check_device(requester) else {
        return Ok(());
    };
    if let Some(recorded) = record_requester(state, *requester) {
        let _ = recorded.await;
    }
    Err(denied)
}

impl MatchmakerService {
    async fn handle(
        &self,
        req: v1::ShareRequest,
        requester: DeviceKey,
    ) -> Result<Response<v1::ShareResponse>, Status> {
        let state = &self.state;
        let loc = req.location.unwrap_or_default();
        let evidence =
            crate::evidence::evidence(&loc).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let conditions = req.conditions.unwrap_or_default();
        let (scene, margin_m) = place(state, &requester, &evidence)?;
        let query = Query {
            evidence,
            wanted: cv::services_from_wire(&conditions.services),
            network: cv::network_from_wire(conditions.network),
            security: cv::security_from_wire(conditions.security),
            explain: req.explain,
            margin_m,
        };
        let cfg = MatchConfig {
            region: state.config().region.clone(),
            fanout: state.config().fanout,
        };
        let registry::Ranked {
            outcome,
            contacts,
            names,
        } = state.registry().rank_in(&query, &cfg, scene);

        // Ask the top M at once; each answers within the deadline or not at all.
        let answers = fan_out(
            state,
            &contacts,
            &outcome.candidates,
            &requester,
            &conditions,
        )
        .instrument(info_span!("access_fanout", asked = contacts.len()))
        .await;

        let now = unix_now();
        let terms = offer::Terms::new(state.config(), &conditions, now);
        let asked: Vec<(Contact, bandshare_matcher::Candidate, offer::Answer)> = contacts
            .into_iter()
            .zip(outcome.candidates.iter().cloned())
            .zip(answers)
            .map(|((c, cand), a)| (c, cand, a))
            .collect();
        let candidates = asked.len();
        let (offers, mut explain) = offer::from_answers(
            &asked,
            &terms,
            &state.signer(),
            requester,
            state.config().access_deadline.as_millis(),
            req.explain,
            ticket_nonce,
        );
        if req.explain {
            explain.extend(outcome.rejected.iter().map(|v| v1::Verdict {
                sharer: names.get(&v.id).cloned().unwrap_or_default(),
                offered: false,
                reason: v.reason.clone(),
                distance_band: v.band.as_str().to_string(),
                score: 0.0,
            }));
        }
        state.count_share_request();
        state.remember_offered(
            &requester,
            offers
                .iter()
                .filter_map(|o| DeviceKey::from_slice(&o.sharer_key).ok()),
        );
        info!(
            scene = outcome.scene.scene.as_str(),
            candidates,
            offers = offers.len(),
            "share request answered"
        );
        debug!(reason = %outcome.scene.reason, "scene decision");
        record_requester(state, requester);
        // Scaled out with Redis unreachable: this coordinator's own sharers
        // are still offered from memory; with none, say why, so the agent
        // tries another coordinator instead of concluding nobody is near.
        if offers.is_empty()
            && let Some(c) = state.cluster()
            && c.is_down()
        {
            return Err(Status::unavailable(
                "no sharer of this coordinator is near, and the rest of the service cannot be reached (its Redis Cluster is unreachable); retry, or try another coordinator",
            ));
        }
        Ok(Response::new(v1::ShareResponse {
            scene: cv::scene_to_wire(Some(outcome.scene.scene)),
            scene_reason: outcome.scene.reason,
            offers,
            explain,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use crate::registry::Handle;
    use bandshare_core::{DistanceBand, LinkState, Position};
    use bandshare_matcher::{Candidate, SharerInfo};
    use std::time::{Duration, Instant};

    fn sharer(state: &State, n: u8, tx: &registry::Outbound) -> Contact {
        let p = Position {
            lat: 59.91,
            lon: 10.75,
            alt: None,
        };
        let info = SharerInfo {
            name: format!("s{n}").into(),
            position: p,
            exact: p,
            heading_deg: None,
            speed_mps: None,
            services: Default::default(),
            network: None,
            security: None,
            link: LinkState::default(),
            accepting: true,
            active_requesters: 0,
            max_requesters: 4,
            fingerprint: Default::default(),
            cell: None,
            router: None,
        };
        let handle = Handle {
            key: DeviceKey([n; 32]),
            relay_endpoints: vec![],
            relay_cert_sha256: vec![],
            route: registry::Route::Local(tx.clone()),
            generation: 0,
            last_seen: Instant::now(),
            mac_key: Default::default(),
        };
        state.registry().add(info, handle);
        state
            .registry()
            .contact_of(&DeviceKey([n; 32]))
            .expect("online")
    }

    /// The sharer `c`'s side of its stream: every ask on `rx` answered
    /// with `accept` (and `reason`).
    fn answer_every_ask(
        state: &std::sync::Arc<State>,
        c: &Contact,
        mut rx: tokio::sync::mpsc::Receiver<Result<v1::CoordinatorMessage, tonic::Status>>,
        accept: bool,
        reason: &'static str,
    ) {
        let (state, id, generation) = (state.clone(), c.id, c.handle.generation);
        tokio::spawn(async move {
            while let Some(Ok(m)) = rx.recv().await {
                if let Some(v1::coordinator_message::Msg::AccessRequest(r)) = m.msg {
                    state.registry().answer(
                        id,
                        generation,
                        v1::AccessResponse {
                            request_id: r.request_id,
                            accept,
                            reason: reason.into(),
                            ..Default::default()
                        },
                    );
                }
            }
        });
    }

    #[tokio::test]
    async fn one_deadline_bounds_the_fan_out_and_no_ask_is_left_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            access_deadline: Duration::from_millis(1000),
            ..Config::default()
        };
        let state = State::new(
            config,
            bandshare_store::Store::open(dir.path()).expect("store"),
        )
        .expect("state");
        // Two sharer streams: the first answers every ask, the second none.
        let (tx_a, rx_a) = tokio::sync::mpsc::channel(8);
        let (tx_b, mut rx_b) = tokio::sync::mpsc::channel(8);
        let a = sharer(&state, 1, &tx_a);
        let b = sharer(&state, 2, &tx_b);
        answer_every_ask(&state, &a, rx_a, true, "");
        let cand = |c: &Contact| Candidate {
            id: c.id,
            score: 1.0,
            distance_m: 5.0,
            band: DistanceBand::Under10m,
            contact_s: 60.0,
        };
        let candidates = [cand(&a), cand(&b)];
        let t = Instant::now();
        let answers = fan_out(
            &state,
            &[a, b],
            &candidates,
            &DeviceKey([9; 32]),
            &v1::Conditions::default(),
        )
        .await;
        let took = t.elapsed();
        assert!(matches!(answers[0], offer::Answer::Accepted(_)));
        assert!(matches!(answers[1], offer::Answer::Silent));
        assert!(
            took >= Duration::from_millis(1000),
            "returned before the deadline: {took:?}"
        );
        // The silent sharer was asked, and its ask is not left pending.
        assert!(rx_b.try_recv().is_ok(), "the silent sharer was not asked");
        assert_eq!(state.registry().pending_asks(), 0);

        // A share request dropped while it waits (its client gave up, a
        // gRPC timeout) leaves nothing pending either: asks are forgotten
        // as their futures drop, not only at their deadline.
        let b = state
            .registry()
            .contact_of(&DeviceKey([2; 32]))
            .expect("online");
        let candidates = [cand(&b)];
        let cancelled = tokio::time::timeout(
            Duration::from_millis(50),
            fan_out(
                &state,
                &[b],
                &candidates,
                &DeviceKey([9; 32]),
                &v1::Conditions::default(),
            ),
        )
        .await;
        assert!(cancelled.is_err(), "the silent sharer answered");
        assert!(rx_b.try_recv().is_ok(), "the silent sharer was not asked");
        assert_eq!(state.registry().pending_asks(), 0);

        // With every sharer answering, the fan-out does not wait for the
        // deadline.
        let (tx_c, rx_c) = tokio::sync::mpsc::channel(8);
        let c = sharer(&state, 3, &tx_c);
        answer_every_ask(&state, &c, rx_c, false, "busy");
        let candidates = [cand(&c)];
        let t = Instant::now();
        let answers = fan_out(
            &state,
            &[c],
            &candidates,
            &DeviceKey([9; 32]),
            &v1::Conditions::default(),
        )
        .await;
        assert!(matches!(&answers[0], offer::Answer::Declined(r) if r == "busy"));
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(state.registry().pending_asks(), 0);
    }
}
