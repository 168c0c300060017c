//! `Matchmaker.RequestShare`: decide the scene, rank candidates, push access
//! requests to the top M over their streams with a deadline, and turn the
//! acceptances into offers with signed tickets, best first. Offers carry a
//! distance band, never coordinates.

use crate::offer;
use crate::registry::{self, Contact};
use crate::{Shared, unix_now};
use bandshare_core::DeviceKey;
use bandshare_matcher::{MatchConfig, Query};
use bandshare_proto::convert as cv;
use bandshare_proto::v1::{self, coordinator_message::Msg as Down};
use bandshare_store::Role;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

pub struct MatchmakerService {
    pub(crate) shared: Arc<Shared>,
}

async fn ask(
    shared: &Shared,
    c: &Contact,
    requester: &DeviceKey,
    conditions: &v1::Conditions,
    band: &str,
) -> offer::Answer {
    let (request_id, rx) = shared.registry.expect_answer(c.id, c.handle.generation);
    let deadline = shared.config.access_deadline;
    let req = v1::AccessRequest {
        request_id,
        requester_key: requester.0.to_vec(),
        conditions: Some(conditions.clone()),
        distance_band: band.to_string(),
        deadline_ms: deadline.as_millis() as u32,
    };
    let sent = c
        .handle
        .tx
        .try_send(Ok(v1::CoordinatorMessage {
            msg: Some(Down::AccessRequest(req)),
        }))
        .is_ok();
    if !sent {
        shared.registry.forget_answer(request_id);
        return offer::Answer::Silent;
    }
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(resp)) if resp.accept => offer::Answer::Accepted(resp),
        Ok(Ok(resp)) => offer::Answer::Declined(resp.reason),
        _ => {
            shared.registry.forget_answer(request_id);
            offer::Answer::Silent
        }
    }
}

fn random_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    let rng = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&rng, &mut n).is_err() {
        // Never expected; fall back to a non-cryptographic source rather
        // than failing the request. Nonces only need to be unique.
        n = fastrand::u128(..).to_be_bytes();
    }
    n
}

/// Notes which sharers `requester` was offered (bounded: forgets everyone
/// when it grows past 100,000 requesters).
fn remember_offered(
    shared: &Shared,
    requester: &DeviceKey,
    sharers: impl Iterator<Item = DeviceKey>,
) {
    if let Ok(mut m) = shared.offered.lock() {
        if m.len() > 100_000 {
            m.clear();
        }
        let set = m.entry(*requester).or_default();
        set.extend(sharers);
        if set.len() > 64 {
            set.clear();
        }
    }
}

#[tonic::async_trait]
impl v1::matchmaker_server::Matchmaker for MatchmakerService {
    async fn refresh_tickets(
        &self,
        req: Request<v1::TicketRefresh>,
    ) -> Result<Response<v1::ShareResponse>, Status> {
        let _permit = self.shared.admit_request()?;
        let req = req.into_inner();
        let shared = &self.shared;
        let requester = self
            .proven(&req.requester_key, &req.proof, req.signed_at_unix)
            .await?;
        if req.sharer_keys.len() > 16 {
            return Err(Status::invalid_argument(
                "at most 16 sharer keys per refresh",
            ));
        }
        shared
            .privacy
            .lock()
            .map_err(|_| Status::internal("privacy state poisoned"))?
            .admit(&requester, None, std::time::Instant::now())
            .map_err(|r| Status::resource_exhausted(r.to_string()))?;
        let allowed = shared
            .offered
            .lock()
            .map(|m| m.get(&requester).cloned().unwrap_or_default())
            .unwrap_or_default();
        let contacts: Vec<Contact> = req
            .sharer_keys
            .iter()
            .filter_map(|k| DeviceKey::from_slice(k).ok())
            .filter(|k| allowed.contains(k))
            .filter_map(|k| shared.registry.contact_of(&k))
            .collect();
        let terms = offer::Terms::new(&shared.config, &v1::Conditions::default(), unix_now());
        let offers = offer::refreshed(&contacts, &terms, &shared.signer(), requester, random_nonce);
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
        let _permit = self.shared.admit_request()?;
        let req = req.into_inner();
        let requester = self
            .proven(&req.requester_key, &req.proof, req.signed_at_unix)
            .await?;
        let span = info_span!("share_request", requester = %requester.short());
        self.handle(req, requester).instrument(span).await
    }
}

impl MatchmakerService {
    /// The requester a request names, once it has proven holding the key
    /// and is allowed in (enrolled, not revoked).
    async fn proven(
        &self,
        key: &[u8],
        proof: &[u8],
        signed_at_unix: u64,
    ) -> Result<DeviceKey, Status> {
        let requester = DeviceKey::from_slice(key)
            .map_err(|e| Status::invalid_argument(format!("requester_key: {e}")))?;
        bandshare_core::ticket::verify_request(
            &requester,
            proof,
            signed_at_unix,
            crate::unix_now(),
        )
        .map_err(Status::unauthenticated)?;
        self.enrolled(&requester).await?;
        Ok(requester)
    }

    /// Refuses a revoked or (in approval mode) unapproved requester; the
    /// latter is recorded so the operator can approve it.
    async fn enrolled(&self, requester: &DeviceKey) -> Result<(), Status> {
        let Err(denied) = self.shared.check_device(requester) else {
            return Ok(());
        };
        let fresh = self
            .shared
            .known_requesters
            .lock()
            .map(|mut k| k.insert(*requester))
            .unwrap_or(false);
        if fresh {
            let store = self.shared.store.clone();
            let key = *requester;
            let _ = tokio::task::spawn_blocking(move || {
                store.upsert_device(&key, "requester", Role::Requester, crate::unix_now())
            })
            .await;
        }
        Err(denied)
    }

    async fn handle(
        &self,
        req: v1::ShareRequest,
        requester: DeviceKey,
    ) -> Result<Response<v1::ShareResponse>, Status> {
        let shared = &self.shared;
        let loc = req.location.unwrap_or_default();
        let evidence = crate::evidence::evidence(&loc).map_err(Status::invalid_argument)?;
        let conditions = req.conditions.unwrap_or_default();
        // How far the measuring point moved at most: the search reaches that
        // much further so no sharer inside the region is missed.
        let mut margin_m = 0.0;
        let mut scene;
        {
            let mut guard = shared
                .privacy
                .lock()
                .map_err(|_| Status::internal("privacy state poisoned"))?;
            guard
                .admit(&requester, evidence.fix, std::time::Instant::now())
                .map_err(|r| match r {
                    crate::privacy::Refusal::RateLimited { .. } => {
                        Status::resource_exhausted(r.to_string())
                    }
                    crate::privacy::Refusal::Implausible { .. } => {
                        Status::failed_precondition(r.to_string())
                    }
                })?;
            // The scene, decided once; where it compares positions as
            // points, measure from this requester's secret offset point.
            scene = bandshare_matcher::decide_scene(&evidence, &shared.config.region)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if let Some(fix) = evidence.fix
                && bandshare_matcher::measured_from_an_offset(scene.scene)
            {
                scene = scene.centred_on(guard.measuring_point(&requester, &fix));
                margin_m = shared.config.privacy.fuzz_max_m;
            }
        }
        let query = Query {
            evidence,
            wanted: cv::services_from_wire(&conditions.services),
            network: cv::network_from_wire(conditions.network),
            explain: req.explain,
            margin_m,
        };
        let cfg = MatchConfig {
            region: shared.config.region.clone(),
            fanout: shared.config.fanout,
        };
        let registry::Ranked {
            outcome,
            contacts,
            names,
        } = shared.registry.rank_in(&query, &cfg, scene);

        // Ask the top M at once; each answers within the deadline or not at all.
        let answers = async {
            let asks = contacts
                .iter()
                .zip(&outcome.candidates)
                .map(|(c, cand)| ask(shared, c, &requester, &conditions, cand.band.as_str()));
            futures::future::join_all(asks).await
        }
        .instrument(info_span!("access_fanout", asked = contacts.len()))
        .await;

        let now = unix_now();
        let terms = offer::Terms::new(&shared.config, &conditions, now);
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
            &shared.signer(),
            requester,
            shared.config.access_deadline.as_millis(),
            random_nonce,
        );
        if req.explain {
            explain.extend(outcome.rejected.iter().map(|v| v1::Verdict {
                sharer: names.get(&v.id).cloned().unwrap_or_default(),
                offered: false,
                reason: v.reason.clone(),
                distance_band: v.band.as_str().to_string(),
                score: 0.0,
            }));
        } else {
            explain.clear();
        }
        shared
            .share_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        remember_offered(
            shared,
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
        let first_time = shared
            .known_requesters
            .lock()
            .map(|mut k| k.insert(requester))
            .unwrap_or(false);
        if first_time {
            let store = shared.store.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.upsert_device(&requester, "requester", Role::Requester, now) {
                    warn!(error = %e, "cannot record requester");
                }
            });
        }
        Ok(Response::new(v1::ShareResponse {
            scene: cv::scene_to_wire(Some(outcome.scene.scene)),
            scene_reason: outcome.scene.reason,
            offers,
            explain,
        }))
    }
}
