//! `sse_server`'s `GET /metrics`, scraped from the built binary as
//! Prometheus would, with the per-client path and with `--hub`: while a
//! reading client and a stalled one are connected the text lists the
//! layer's series and (with `--hub`) the hubs' with plausible values, every
//! counter's name ends in `_total` and no other's does; once the clients go
//! the gauges say so.
//!
//! The binaries are built as `tests/examples.rs` builds them (see
//! `tests/binaries`). Every wait is bounded; the server is killed if the
//! test fails. Only loopback is used.

mod binaries;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use binaries::*;

/// How long a condition on the scraped values may take (a stalled client
/// fills hyper's and the kernel's buffers before its first drop).
const SETTLE: Duration = Duration::from_secs(30);

/// One scrape: the samples by name, each with its labels, and each metric's
/// `# TYPE`.
#[derive(Debug)]
struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample: series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    let labels = labels.strip_suffix('}').expect("labels end with }");
                    let labels = labels
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(|l| {
                            let (k, v) = l.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Self {
            samples,
            types,
            text,
        }
    }

    /// The sum of the series `name` whose labels include `labels`, if any
    /// matches (e.g. closed streams over every `reason`).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, _, value)| *value)
            .reduce(|a, b| a + b)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", self.text))
    }

    /// Prometheus conventions: counters end in `_total`, nothing else does;
    /// no label names a client.
    fn check_conventions(&self) {
        assert!(!self.types.is_empty(), "no # TYPE line:\n{}", self.text);
        for (name, kind) in &self.types {
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} is a {kind}"
            );
        }
        for (name, labels, _) in &self.samples {
            assert!(self.types.contains_key(name), "{name} has no # TYPE");
            for key in labels.keys() {
                assert!(
                    ["route", "reason"].contains(&key.as_str()),
                    "{name}: label {key}"
                );
            }
        }
    }
}

/// `GET /metrics`.
async fn scrape(addr: SocketAddr) -> Scrape {
    let body = get_ok(addr, "/metrics", "text/plain; version=0.0.4; charset=utf-8").await;
    Scrape::parse(String::from_utf8(body.to_vec()).unwrap())
}

/// Scrapes until `ready` holds (at most [`SETTLE`]); returns that scrape.
async fn scrape_until(addr: SocketAddr, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    within(SETTLE, what, async {
        loop {
            let s = scrape(addr).await;
            if ready(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

const EVENTS: &[(&str, &str)] = &[("route", "/events")];
const NDJSON: &[(&str, &str)] = &[("route", "/stream.ndjson")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_per_client_path() {
    let server = start("sse_server", "--rate 2000 --size 1024 --capacity 20").await;
    let addr = server.addr;

    // Before any client: the sources' series, none of the hubs'.
    let s = scrape(addr).await;
    s.check_conventions();
    assert_eq!(s.value("backpressure_clients_open", &[]), 0.0);
    assert!(!s.text.contains("backpressure_hub_"), "{}", s.text);

    let fast = reader(addr, "/events").await;
    let slow = stalled(addr, "/events").await;
    // Until the stalled client is under pressure and dropping: hyper's and
    // the kernel's buffers fill first, and a frame they take may let it
    // recover for a moment.
    let s = scrape_until(addr, "the stalled client's drops", |s| {
        s.get("backpressure_frames_dropped_total", EVENTS)
            .is_some_and(|n| n > 0.0)
            && s.get("backpressure_clients_under_pressure", EVENTS)
                .is_some_and(|n| n >= 1.0)
    })
    .await;
    s.check_conventions();
    assert_eq!(s.value("backpressure_clients_open", &[]), 2.0);
    assert_eq!(s.value("backpressure_streams_opened_total", EVENTS), 2.0);
    // The stalled client's buffer is full (20 frames of about 1 KiB), as
    // last reported.
    let frames = s.value("backpressure_buffered_frames", EVENTS);
    assert!((1.0..=40.0).contains(&frames), "{frames}");
    let bytes = s.value("backpressure_buffered_bytes", EVENTS);
    assert!(
        bytes >= frames * 1024.0,
        "{bytes} bytes for {frames} frames"
    );
    // The stalled client, and the reading one for a moment at most.
    let pressure = s.value("backpressure_clients_under_pressure", EVENTS);
    assert!((1.0..=2.0).contains(&pressure), "{pressure}");
    assert!(!s.text.contains("backpressure_hub_"), "{}", s.text);

    drop((fast, slow));
    let s = scrape_until(addr, "both clients to close", |s| {
        s.get("backpressure_clients_open", &[]) == Some(0.0)
            && s.get("backpressure_streams_closed_total", EVENTS) == Some(2.0)
    })
    .await;
    s.check_conventions();
    assert_eq!(s.value("backpressure_clients_under_pressure", EVENTS), 0.0);
    assert_eq!(s.value("backpressure_buffered_frames", EVENTS), 0.0);
    assert_eq!(s.value("backpressure_buffered_bytes", EVENTS), 0.0);
    server.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_with_hub() {
    let server = start(
        "sse_server",
        "--hub --retain 100 --rate 2000 --size 1024 --capacity 20",
    )
    .await;
    let addr = server.addr;

    let s = scrape(addr).await;
    s.check_conventions();
    for route in [EVENTS, NDJSON] {
        assert_eq!(s.value("backpressure_hub_subscribers", route), 0.0);
    }

    let fast = reader(addr, "/events").await;
    let slow = stalled(addr, "/events").await;
    let s = scrape_until(addr, "the hub to let frames go, and drops", |s| {
        s.get("backpressure_hub_frames_dropped_total", EVENTS)
            .is_some_and(|n| n > 0.0)
            && s.get("backpressure_frames_dropped_total", EVENTS)
                .is_some_and(|n| n > 0.0)
    })
    .await;
    s.check_conventions();
    // The producer publishes each event into both hubs.
    let published = s.value("backpressure_hub_frames_published_total", EVENTS);
    assert!(published > 100.0, "{published}");
    assert!(s.value("backpressure_hub_frames_published_total", NDJSON) > 100.0);
    assert_eq!(s.value("backpressure_hub_subscribers", EVENTS), 2.0);
    assert_eq!(s.value("backpressure_hub_subscribers", NDJSON), 0.0);
    for route in [EVENTS, NDJSON] {
        assert_eq!(s.value("backpressure_hub_retained_frames", route), 100.0);
        let bytes = s.value("backpressure_hub_retained_bytes", route);
        assert!(bytes > 100.0 * 1024.0, "{bytes}");
        let dropped = s.value("backpressure_hub_frames_dropped_total", route);
        assert!(dropped > 0.0 && dropped < published, "{dropped}");
    }
    assert_eq!(s.value("backpressure_clients_open", &[]), 2.0);
    assert_eq!(s.value("backpressure_streams_opened_total", EVENTS), 2.0);

    drop((fast, slow));
    let s = scrape_until(addr, "both clients to close", |s| {
        s.get("backpressure_hub_subscribers", EVENTS) == Some(0.0)
            && s.get("backpressure_clients_open", &[]) == Some(0.0)
    })
    .await;
    s.check_conventions();
    assert_eq!(s.value("backpressure_streams_closed_total", EVENTS), 2.0);
    server.stop_cleanly().await;
}
