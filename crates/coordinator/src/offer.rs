//! Offers, built in one place and without I/O: the terms of a request
//! (ticket expiry, the byte quota clamped to the coordinator's, how many
//! offers), one MAC'd ticket per accepted sharer, the offer itself with a
//! distance band and never coordinates, and the verdicts `--explain` shows.
//! Both `RequestShare` and `RefreshTickets` build offers here; the gRPC
//! handlers in `matchmaker.rs` only gather answers and send the result.
//!
//! Tested by unit tests with a fixed clock and nonces.

use crate::config::Config;
use crate::registry::Contact;
use bandshare_core::{DeviceKey, Ticket, TicketSigner};
use bandshare_matcher::Candidate;
use bandshare_proto::convert as cv;
use bandshare_proto::v1;

/// What came of asking one candidate.
pub enum Answer {
    Accepted(v1::AccessResponse),
    Declined(String),
    Silent,
}

/// The terms every offer of one request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Terms {
    pub expires_unix: u64,
    pub quota_bytes: u64,
    pub max_offers: usize,
}

impl Terms {
    /// The coordinator's terms at `now_unix`, narrowed by what the
    /// requester asked for (fewer bytes, fewer offers; never more).
    pub fn new(config: &Config, conditions: &v1::Conditions, now_unix: u64) -> Terms {
        Terms {
            expires_unix: now_unix + config.ticket_lifetime.as_secs(),
            quota_bytes: match conditions.quota_bytes {
                0 => config.quota_bytes,
                q => q.min(config.quota_bytes),
            },
            max_offers: match conditions.max_offers {
                0 => config.max_offers,
                n => (n as usize).min(config.max_offers),
            },
        }
    }

    /// A ticket for `c`, MAC'd under its key kept on its stream's handle.
    fn ticket(
        &self,
        signer: &TicketSigner,
        c: &Contact,
        requester: DeviceKey,
        nonce: [u8; 16],
    ) -> Vec<u8> {
        let sharer = c.handle.key;
        let kept = c
            .handle
            .mac_key
            .get_or_init(|| signer.sharer_mac_key(&sharer));
        signer.mac_with(
            Some(kept),
            Ticket {
                key_id: 0,
                sharer,
                requester,
                expires_unix: self.expires_unix,
                nonce,
                quota_bytes: self.quota_bytes,
            },
        )
    }
}

/// One offer for `c` with its ticket.
fn offer(
    c: &Contact,
    ticket: Vec<u8>,
    terms: &Terms,
    endpoints: Vec<String>,
    link: bandshare_core::LinkState,
    band: &str,
    score: f64,
) -> v1::Offer {
    v1::Offer {
        sharer: c.info.name.to_string(),
        sharer_key: c.handle.key.0.to_vec(),
        relay_endpoints: endpoints,
        relay_cert_sha256: c.handle.relay_cert_sha256.clone(),
        ticket,
        services: cv::services_to_wire(c.info.services),
        network: cv::network_to_wire(c.info.network),
        link: Some(cv::link_to_wire(&link)),
        distance_band: band.to_string(),
        score,
        ticket_expires_unix: terms.expires_unix,
    }
}

/// Offers (best first, at most `terms.max_offers`) and, with `explain`, a
/// verdict for every candidate asked, from their answers. Without it no
/// verdict is built (their strings cost more than the rest of the offers).
pub fn from_answers(
    asked: &[(Contact, Candidate, Answer)],
    terms: &Terms,
    signer: &TicketSigner,
    requester: DeviceKey,
    deadline_ms: u128,
    explain: bool,
    mut nonce: impl FnMut() -> [u8; 16],
) -> (Vec<v1::Offer>, Vec<v1::Verdict>) {
    let mut offers = Vec::with_capacity(terms.max_offers.min(asked.len()));
    let mut verdicts = vec![];
    for (c, cand, answer) in asked {
        let mut verdict = |offered: bool, reason: &dyn Fn() -> String| {
            if !explain {
                return;
            }
            verdicts.push(v1::Verdict {
                sharer: c.info.name.to_string(),
                offered,
                reason: reason(),
                distance_band: cand.band.as_str().to_string(),
                score: cand.score,
            })
        };
        match answer {
            Answer::Accepted(resp) if offers.len() < terms.max_offers => {
                let ticket = terms.ticket(signer, c, requester, nonce());
                // The sharer's fresh answer wins over what its stream said.
                let endpoints = if resp.relay_endpoints.is_empty() {
                    c.handle.relay_endpoints.clone()
                } else {
                    resp.relay_endpoints.clone()
                };
                let mut link = resp
                    .link
                    .map(|l| cv::link_from_wire(&l))
                    .unwrap_or(c.info.link);
                link.network = c.info.network;
                offers.push(offer(
                    c,
                    ticket,
                    terms,
                    endpoints,
                    link,
                    cand.band.as_str(),
                    cand.score,
                ));
                verdict(true, &|| {
                    if cand.contact_s >= bandshare_matcher::rank::CONTACT_CAP_S {
                        "offered (in range for a long time)".to_string()
                    } else {
                        format!("offered (in range for ~{:.0} s)", cand.contact_s)
                    }
                });
            }
            Answer::Accepted(_) => {
                verdict(false, &|| format!("more than {} offers", terms.max_offers))
            }
            Answer::Declined(why) => verdict(false, &|| format!("declined: {why}")),
            Answer::Silent => verdict(false, &|| format!("no answer within {deadline_ms} ms")),
        }
    }
    (offers, verdicts)
}

/// A fresh ticket for each sharer `requester` was offered before and that
/// is still online (a refresh asks no sharer and carries no band).
pub fn refreshed(
    contacts: &[Contact],
    terms: &Terms,
    signer: &TicketSigner,
    requester: DeviceKey,
    mut nonce: impl FnMut() -> [u8; 16],
) -> Vec<v1::Offer> {
    contacts
        .iter()
        .map(|c| {
            let ticket = terms.ticket(signer, c, requester, nonce());
            offer(
                c,
                ticket,
                terms,
                c.handle.relay_endpoints.clone(),
                c.info.link,
                "",
                0.0,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Handle;
    use bandshare_core::{DistanceBand, Position, TicketVerifier};
    use bandshare_matcher::SharerInfo;
    use std::sync::Arc;

    const NOW: u64 = 1_800_000_000;

    fn contact(n: u8) -> Contact {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let position = Position::new(39.9, 116.4, None).expect("position");
        Contact {
            id: n as u32,
            info: Arc::new(SharerInfo {
                name: format!("s{n}").as_str().into(),
                position,
                exact: position,
                heading_deg: None,
                speed_mps: None,
                services: Default::default(),
                network: None,
                security: None,
                link: Default::default(),
                accepting: true,
                active_requesters: 0,
                max_requesters: 0,
                fingerprint: Default::default(),
                cell: None,
                router: None,
            }),
            handle: Arc::new(Handle {
                key: DeviceKey([n; 32]),
                relay_endpoints: vec![format!("192.0.2.{n}:7500")],
                relay_cert_sha256: vec![n; 32],
                route: crate::registry::Route::Local(tx),
                generation: 1,
                last_seen: std::time::Instant::now(),
                mac_key: Default::default(),
            }),
        }
    }

    fn candidate(n: u8, score: f64) -> Candidate {
        Candidate {
            id: n as u32,
            score,
            distance_m: 5.0,
            band: DistanceBand::of_metres(5.0),
            contact_s: 12.0,
        }
    }

    fn accepted(endpoint: &str) -> Answer {
        Answer::Accepted(v1::AccessResponse {
            accept: true,
            relay_endpoints: vec![endpoint.into()]
                .into_iter()
                .filter(|e: &String| !e.is_empty())
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn terms_never_exceed_the_coordinators() {
        let cfg = Config::default();
        let t = Terms::new(&cfg, &v1::Conditions::default(), NOW);
        assert_eq!(t.expires_unix, NOW + cfg.ticket_lifetime.as_secs());
        assert_eq!(
            (t.quota_bytes, t.max_offers),
            (cfg.quota_bytes, cfg.max_offers)
        );
        let asked = v1::Conditions {
            quota_bytes: 1000,
            max_offers: 2,
            ..Default::default()
        };
        let t = Terms::new(&cfg, &asked, NOW);
        assert_eq!((t.quota_bytes, t.max_offers), (1000, 2));
        let greedy = v1::Conditions {
            quota_bytes: u64::MAX,
            max_offers: 1000,
            ..Default::default()
        };
        let t = Terms::new(&cfg, &greedy, NOW);
        assert_eq!(
            (t.quota_bytes, t.max_offers),
            (cfg.quota_bytes, cfg.max_offers)
        );
    }

    #[test]
    fn accepted_answers_become_offers_with_bound_tickets() {
        let signer = TicketSigner::from_seed(&[1; 32], 1);
        // Each sharer verifies with its own MAC key (v2 tickets).
        let verifier = |k: u8| {
            TicketVerifier::new(&[signer.public_key()])
                .with_mac_keys(&[(1, signer.mac_key(&DeviceKey([k; 32])))])
        };
        let requester = DeviceKey([9; 32]);
        let terms = Terms {
            expires_unix: NOW + 120,
            quota_bytes: 5000,
            max_offers: 2,
        };
        let asked = vec![
            (contact(1), candidate(1, 0.9), accepted("")),
            (
                contact(2),
                candidate(2, 0.8),
                Answer::Declined("busy".into()),
            ),
            (contact(3), candidate(3, 0.7), accepted("198.51.100.3:7501")),
            (contact(4), candidate(4, 0.6), Answer::Silent),
            (contact(5), candidate(5, 0.5), accepted("")),
        ];
        let mut n = 0u8;
        let (offers, verdicts) =
            from_answers(&asked, &terms, &signer, requester, 300, true, || {
                n += 1;
                [n; 16]
            });
        let names: Vec<&str> = offers.iter().map(|o| o.sharer.as_str()).collect();
        assert_eq!(names, ["s1", "s3"]);
        assert_eq!(
            offers[0].relay_endpoints,
            ["192.0.2.1:7500"],
            "from the stream"
        );
        assert_eq!(
            offers[1].relay_endpoints,
            ["198.51.100.3:7501"],
            "the fresh answer wins"
        );
        for (o, k) in offers.iter().zip([1u8, 3]) {
            assert_eq!(o.ticket.len(), bandshare_core::MAC_TICKET_LEN);
            let t = verifier(k)
                .verify(&o.ticket, &DeviceKey([k; 32]), &requester, NOW)
                .expect("a ticket for this sharer and requester");
            assert_eq!((t.quota_bytes, t.expires_unix), (5000, NOW + 120));
            assert_eq!(o.distance_band, "<10m");
        }
        let reasons: Vec<&str> = verdicts.iter().map(|v| v.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "offered (in range for ~12 s)",
                "declined: busy",
                "offered (in range for ~12 s)",
                "no answer within 300 ms",
                "more than 2 offers"
            ]
        );
        // Without explain: the same offers, and no verdict built.
        let (quiet, none) =
            from_answers(&asked, &terms, &signer, requester, 300, false, || [0; 16]);
        let quiet: Vec<&str> = quiet.iter().map(|o| o.sharer.as_str()).collect();
        assert_eq!(quiet, names);
        assert!(none.is_empty(), "{none:?}");
        let again = refreshed(&[contact(7)], &terms, &signer, requester, || [42; 16]);
        assert_eq!(again.len(), 1);
        assert!(again[0].distance_band.is_empty());
        verifier(7)
            .verify(&again[0].ticket, &DeviceKey([7; 32]), &requester, NOW)
            .expect("refreshed ticket");
    }
}
