//! Criterion micro-benchmarks of the hot pure pieces: the index query with
//! scoring, scoring alone, ticket sign/verify and the flow-header codec.
//! Run: `cargo bench -p bandshare-bench`.

use bandshare_bench::matching::random_point;
use bandshare_core::{
    DeviceKey, LinkState, NetworkType, Service, Ticket, TicketSigner, TicketVerifier,
};
use bandshare_matcher::{Index, MatchConfig, Query, SharerInfo, rank, rank::score};
use bandshare_relay::wire::{FlowHeader, Host};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn sharer(i: usize, rng: &mut fastrand::Rng) -> SharerInfo {
    let position = random_point(rng);
    SharerInfo {
        name: format!("s{i}").into(),
        position,
        exact: position,
        heading_deg: None,
        speed_mps: None,
        services: [Service::Hotspot].into_iter().collect(),
        network: Some(NetworkType::FiveG),
        security: None,
        link: LinkState {
            rtt_us: 20_000,
            ..LinkState::default()
        },
        accepting: true,
        active_requesters: 1,
        max_requesters: 4,
        fingerprint: Default::default(),
        cell: None,
        router: None,
    }
}

fn index(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(1);
    for n in [100_000usize, 1_000_000] {
        let mut idx = Index::default();
        for i in 0..n {
            idx.insert(sharer(i, &mut rng));
        }
        let cfg = MatchConfig {
            fanout: 10,
            ..MatchConfig::default()
        };
        c.bench_function(&format!("index rank top10 at {n} sharers"), |b| {
            b.iter(|| {
                let q = Query {
                    evidence: bandshare_matcher::Evidence {
                        fix: Some(random_point(&mut rng)),
                        ..Default::default()
                    },
                    wanted: [Service::Hotspot].into_iter().collect(),
                    network: None,
                    security: None,
                    margin_m: 0.0,
                    explain: false,
                };
                black_box(rank(&idx, &q, &cfg).map(|o| o.candidates.len()))
            })
        });
    }
    let s = bandshare_matcher::Summary::of(&sharer(0, &mut rng));
    c.bench_function("score one sharer", |b| {
        b.iter(|| black_box(score(black_box(&s), black_box(37.0), black_box(300.0))))
    });
}

fn tickets(c: &mut Criterion) {
    let signer = TicketSigner::from_seed(&[3; 32], 1);
    let verifier = TicketVerifier::new(&[signer.public_key()]);
    let t = Ticket {
        key_id: 1,
        sharer: DeviceKey([1; 32]),
        requester: DeviceKey([2; 32]),
        expires_unix: 2_000_000_000,
        nonce: [9; 16],
        quota_bytes: 1 << 30,
    };
    c.bench_function("ticket sign", |b| {
        b.iter(|| black_box(signer.sign(black_box(t.clone()))))
    });
    c.bench_function("ticket mac (v2)", |b| {
        b.iter(|| black_box(signer.mac(black_box(t.clone()))))
    });
    let kept = signer.sharer_mac_key(&DeviceKey([1; 32]));
    c.bench_function("ticket mac (v2), sharer's key kept", |b| {
        b.iter(|| black_box(signer.mac_with(Some(&kept), black_box(t.clone()))))
    });
    let mac_verifier = TicketVerifier::new(&[signer.public_key()])
        .with_mac_keys(&[(1, signer.mac_key(&DeviceKey([1; 32])))]);
    let mac_bytes = signer.mac(t.clone());
    c.bench_function("ticket verify mac (v2)", |b| {
        b.iter(|| {
            black_box(mac_verifier.verify(
                black_box(&mac_bytes),
                &DeviceKey([1; 32]),
                &DeviceKey([2; 32]),
                1_999_999_000,
            ))
        })
    });
    let bytes = signer.sign(t);
    c.bench_function("ticket verify", |b| {
        b.iter(|| {
            black_box(verifier.verify(
                black_box(&bytes),
                &DeviceKey([1; 32]),
                &DeviceKey([2; 32]),
                1_999_999_000,
            ))
        })
    });
}

fn flow_header(c: &mut Criterion) {
    let h = FlowHeader {
        host: Host::Name("www.example.com".into()),
        port: 443,
    };
    let bytes = h.encode().unwrap_or_default();
    c.bench_function("flow header encode", |b| {
        b.iter(|| black_box(black_box(&h).encode()))
    });
    c.bench_function("flow header decode", |b| {
        b.iter(|| black_box(FlowHeader::decode(black_box(&bytes))))
    });
}

criterion_group!(benches, index, tickets, flow_header);
criterion_main!(benches);
