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
        registry::Route::Local(tx) => state.registry().ask_local(c, tx, req, deadline).await,
        // Its stream is on another coordinator: routed through Redis.
        registry::Route::Remote { owner, .. } => match state.cluster() {
            Some(cl) => cl.ask(owner, &c.handle.key, req, deadline).await,
            None => None,
        },
    };
    let answer = match resp {
        Some(resp) if resp.accept => offer::Answer::Accepted(resp),
        Some(resp) => offer::Answer::Declined(resp.reason),
        None => offer::Answer::Silent,
    };
    state.metrics().access_answer(match answer {
        offer::Answer::Accepted(_) => "accepted",
        offer::Answer::Declined(_) => "declined",
        offer::Answer::Silent => "silent",
    });
    answer
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
        let answers = async {
            let asks = contacts
                .iter()
                .zip(&outcome.candidates)
                .map(|(c, cand)| ask(state, c, &requester, &conditions, cand.band.as_str()));
            futures::future::join_all(asks).await
        }
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
