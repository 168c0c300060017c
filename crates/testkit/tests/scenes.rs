//! The scene table through the real coordinator: for every scene, sharers
//! just inside and just outside each face of its shape, moving and standing,
//! with and without the wanted services, and the offers a requester gets.

use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_core::Scene;
use bandshare_proto::convert as cv;
use bandshare_proto::v1::ShareResponse;
use bandshare_testkit::{Cluster, SharerSpec, center};

fn hotspot() -> ConditionSpec {
    ConditionSpec {
        want: "hotspot".parse().expect("services"),
        ..Default::default()
    }
}

fn offered(r: &ShareResponse) -> Vec<String> {
    let mut v: Vec<String> = r.offers.iter().map(|o| o.sharer.clone()).collect();
    v.sort();
    v
}

fn why(r: &ShareResponse, name: &str) -> String {
    r.explain
        .iter()
        .find(|v| v.sharer == name)
        .map(|v| v.reason.clone())
        .unwrap_or_else(|| "(not considered)".into())
}

fn scene(r: &ShareResponse) -> Option<Scene> {
    cv::scene_from_wire(r.scene)
}

fn at(east: f64, north: f64, alt: Option<f64>) -> LocationSpec {
    let mut p = center().offset_m(east, north);
    p.alt = alt;
    LocationSpec {
        at: Some(p),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outdoor_circle_and_contact_time() {
    let c = Cluster::start(vec![
        SharerSpec::new("inside", 190.0, 0.0),
        SharerSpec::new("outside", 210.0, 0.0),
        SharerSpec::new("no-hotspot", 50.0, 0.0).services("prose"),
        SharerSpec::new("walker", 0.0, 40.0).moving(1.5, 0.0),
        SharerSpec::new("stayer", 0.0, -40.0),
    ])
    .await
    .expect("cluster");
    let r = c.ask(at(0.0, 0.0, None), hotspot()).await.expect("ask");
    assert_eq!(scene(&r), Some(Scene::Outdoor), "{}", r.scene_reason);
    assert_eq!(offered(&r), vec!["inside", "stayer", "walker"]);
    assert_eq!(why(&r, "outside"), "outside the 200 m circle");
    assert_eq!(why(&r, "no-hotspot"), "service missing: hotspot");
    // Same distance, but the walker leaves the circle in ~107 s.
    let rank = |n: &str| {
        r.offers
            .iter()
            .position(|o| o.sharer == n)
            .expect("offered")
    };
    assert!(rank("stayer") < rank("walker"), "{:?}", offered(&r));
    assert!(
        why(&r, "walker").contains("~107 s"),
        "{}",
        why(&r, "walker")
    );
    assert!(
        why(&r, "stayer").contains("long time"),
        "{}",
        why(&r, "stayer")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vehicle_box_along_the_heading_and_moving_with_you() {
    // An eastbound train at 15 m/s; the car is 25 m x 4 m.
    let train = |name: &str, e: f64, n: f64| SharerSpec::new(name, e, n).moving(15.0, 90.0);
    let c = Cluster::start(vec![
        train("ahead-in", 12.0, 0.0),
        train("behind-in", -12.0, 0.5),
        train("ahead-out", 13.5, 0.0),
        train("behind-out", -13.5, 0.0),
        train("left-out", 0.0, 2.5),
        train("right-out", 0.0, -2.5),
        SharerSpec::new("platform", 0.0, 1.0).moving(0.0, 0.0),
        SharerSpec::new("standing-near", 2.0, 0.0),
        SharerSpec::new("other-train", 5.0, -1.0).moving(15.0, 270.0),
        train("in-car-no-hotspot", 3.0, 0.0).services("prose"),
    ])
    .await
    .expect("cluster");
    let mut me = at(0.0, 0.0, None);
    me.speed_mps = Some(15.0);
    me.heading_deg = Some(90.0);
    // No hint: speed and heading say vehicle.
    let r = c.ask(me.clone(), hotspot()).await.expect("ask");
    assert_eq!(scene(&r), Some(Scene::Vehicle), "{}", r.scene_reason);
    assert_eq!(offered(&r), vec!["ahead-in", "behind-in"]);
    assert!(
        why(&r, "ahead-out").contains("ahead of the car"),
        "{}",
        why(&r, "ahead-out")
    );
    assert!(
        why(&r, "behind-out").contains("behind the car"),
        "{}",
        why(&r, "behind-out")
    );
    assert!(
        why(&r, "left-out").contains("left of the car"),
        "{}",
        why(&r, "left-out")
    );
    assert!(
        why(&r, "right-out").contains("right of the car"),
        "{}",
        why(&r, "right-out")
    );
    assert!(
        why(&r, "platform").contains("not moving with you (velocity differs by 15.0"),
        "{}",
        why(&r, "platform")
    );
    assert!(
        why(&r, "standing-near").contains("not known to move with you"),
        "{}",
        why(&r, "standing-near")
    );
    assert!(
        why(&r, "other-train").contains("differs by 30.0"),
        "{}",
        why(&r, "other-train")
    );
    assert_eq!(why(&r, "in-car-no-hotspot"), "service missing: hotspot");
    // The box turns with the heading: heading north, "left-out" (2.5 m north) is ahead in the car.
    let mut north = me.clone();
    north.heading_deg = Some(0.0);
    let r = c.ask(north, ConditionSpec::default()).await.expect("ask");
    assert!(
        why(&r, "left-out").contains("not moving with you"),
        "{}",
        why(&r, "left-out")
    );
    assert!(
        why(&r, "ahead-in").contains("right of the car"),
        "{}",
        why(&r, "ahead-in")
    );
    // The hint alias works and wins over evidence.
    let mut hinted = at(0.0, 0.0, None);
    hinted.scene = Some("subway-car".parse().expect("scene"));
    hinted.heading_deg = Some(90.0);
    let r = c.ask(hinted, hotspot()).await.expect("ask");
    assert_eq!(scene(&r), Some(Scene::Vehicle));
    assert_eq!(r.scene_reason, "scene hint from the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn station_sphere_with_levels() {
    let c = Cluster::start(vec![
        SharerSpec::new("same-level", 55.0, 0.0).alt(-10.0),
        SharerSpec::new("one-down", 10.0, 0.0).alt(-18.0),
        SharerSpec::new("three-down", 5.0, 0.0).alt(-75.0),
        SharerSpec::new("street-above", 5.0, 0.0).alt(62.0),
        SharerSpec::new("far-end", 65.0, 0.0).alt(-10.0),
        SharerSpec::new("no-altitude", 20.0, 0.0),
    ])
    .await
    .expect("cluster");
    let mut me = at(0.0, 0.0, Some(-10.0));
    me.scene = Some(Scene::Station);
    let r = c.ask(me, hotspot()).await.expect("ask");
    assert_eq!(scene(&r), Some(Scene::Station));
    assert_eq!(offered(&r), vec!["no-altitude", "one-down", "same-level"]);
    assert!(
        why(&r, "three-down").contains("65 m below"),
        "{}",
        why(&r, "three-down")
    );
    assert_eq!(why(&r, "far-end"), "outside the 60 m sphere");
    // Outdoors the same places ignore altitude: all within 200 m.
    let r = c
        .ask(at(0.0, 0.0, Some(-10.0)), hotspot())
        .await
        .expect("ask");
    assert_eq!(scene(&r), Some(Scene::Outdoor));
    // (five offers is the server's cap; the sixth is "more than 5 offers")
    assert_eq!(offered(&r).len(), 5);
    assert!(
        r.explain.iter().all(|v| !v.reason.contains("outside")),
        "{:?}",
        r.explain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indoor_same_venue_by_fingerprint_or_router() {
    let hall = [
        ("00:11:22:33:44:01", -45),
        ("00:11:22:33:44:02", -55),
        ("00:11:22:33:44:03", -65),
    ];
    let c = Cluster::start(vec![
        SharerSpec::new("same-venue", 80.0, 0.0)
            .wifi(&[("00:11:22:33:44:01", -50), ("00:11:22:33:44:02", -52)]),
        SharerSpec::new("same-router", 150.0, 0.0).router("00:11:22:33:44:99"),
        SharerSpec::new("next-building", 30.0, 0.0)
            .wifi(&[("00:11:22:33:44:03", -90), ("00:11:22:33:55:01", -40)]),
        SharerSpec::new("gnss-near", 10.0, 0.0).wifi(&[("00:11:22:33:66:01", -40)]),
        SharerSpec::new("venue-no-hotspot", 5.0, 0.0)
            .wifi(&hall)
            .services("wifi6"),
    ])
    .await
    .expect("cluster");
    let mut me = at(0.0, 0.0, None);
    me.accuracy_m = Some(120.0);
    me.wifi = hall.iter().map(|(b, r)| (b.to_string(), *r)).collect();
    me.router = Some("00:11:22:33:44:99".into());
    let r = c.ask(me.clone(), hotspot()).await.expect("ask");
    assert_eq!(scene(&r), Some(Scene::Indoor), "{}", r.scene_reason);
    assert!(
        r.scene_reason.contains("3 access points"),
        "{}",
        r.scene_reason
    );
    assert_eq!(offered(&r), vec!["same-router", "same-venue"]);
    assert!(
        why(&r, "next-building").contains("other venue (Wi-Fi similarity"),
        "{}",
        why(&r, "next-building")
    );
    assert!(
        why(&r, "gnss-near").contains("no shared access point"),
        "{}",
        why(&r, "gnss-near")
    );
    assert_eq!(why(&r, "venue-no-hotspot"), "service missing: hotspot");
    // Without any fix the venue still matches, with bands from radio similarity.
    me.at = None;
    let r = c.ask(me, hotspot()).await.expect("ask");
    assert_eq!(offered(&r), vec!["same-router", "same-venue"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchor_same_cell_and_missing_evidence() {
    let c = Cluster::start(vec![
        SharerSpec::new("same-cell", 900.0, 0.0).cell("460-00-4321-1"),
        SharerSpec::new("other-cell", 0.0, 0.0).cell("460-00-4321-2"),
    ])
    .await
    .expect("cluster");
    let me = LocationSpec {
        cell: Some("460-00-4321-1".into()),
        ..Default::default()
    };
    let r = c.ask(me, hotspot()).await.expect("ask");
    assert_eq!(scene(&r), Some(Scene::Anchor));
    assert_eq!(offered(&r), vec!["same-cell"]);
    assert_eq!(r.offers[0].distance_band, ">200m");
    // Nothing to go on: a clear error, not an empty answer.
    let e = c
        .ask(LocationSpec::default(), hotspot())
        .await
        .expect_err("no location");
    assert!(e.to_string().contains("no usable location"), "{e}");
    let mut indoor = at(0.0, 0.0, None);
    indoor.scene = Some(Scene::Indoor);
    let e = c
        .ask(indoor, hotspot())
        .await
        .expect_err("indoor without Wi-Fi");
    assert!(e.to_string().contains("Wi-Fi scan"), "{e}");
}
