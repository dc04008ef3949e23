//! The agent's sources when the servers behind them misbehave: a fault-injecting proxy
//! (`outpost_tests::faults`) between the real agent and a real registry (docker-registry) or a
//! real git smart-HTTP server. For each fault, with the next release waiting behind it:
//! - the current release stays and nothing is rejected (the fault is the server's, not the
//!   bundle's);
//! - `status.source.last_error` names the cause;
//! - retries keep to the backoff's bounds (at least 0.5 s apart, or the `Retry-After` asked
//!   for; at most one interval, plus the stall timeout when the request stalls);
//! - once the fault clears the waiting release arrives within one interval;
//! - nothing is left in `state_dir/tmp`, and the agent's peak memory stays bounded.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::agent::AgentProcess;
use outpost_tests::faults::{Fault, FaultProxy};
use outpost_tests::forge::{release, signed, tar};
use outpost_tests::git::{VendorRepo, git_http};
use outpost_tests::{TestRegistry, eventually_within};
use std::time::{Duration, Instant};

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];
const INTERVAL: Duration = Duration::from_secs(2);
const STALL: Duration = Duration::from_secs(2);
/// Time for the work itself: a request, verification, the status socket.
const SLACK: Duration = Duration::from_millis(1500);
/// The agent's peak RSS may grow this much across all faults: the registry client refuses a
/// 10 MB header without holding it.
const MEMORY_GROWTH: u64 = 8 << 20;
/// libgit2's HTTP client has no limit on a header's size: it holds the 10 MB header (about
/// 20 MB of peak RSS here). Bounded by what the server sends, not by the agent; see the README.
const MEMORY_GROWTH_LIBGIT2: u64 = 32 << 20;

#[derive(Debug)]
struct Case {
    fault: Fault,
    /// What the faulted requests' request lines contain.
    pattern: &'static str,
    /// What `status.source.last_error` says.
    cause: &'static str,
    /// Attempts to see before the fault is cleared: 3, or 1 where the source waits out the
    /// one request in flight rather than start another (git's stalled fetch).
    attempts: usize,
}

fn case(fault: Fault, pattern: &'static str, cause: &'static str) -> Case {
    Case {
        fault,
        pattern,
        cause,
        attempts: 3,
    }
}

fn peak_rss(agent: &AgentProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// When each faulted attempt started: requests within 200 ms of an attempt's first belong to
/// it (a redirect loop's hops).
fn attempt_starts(proxy: &FaultProxy) -> Vec<Instant> {
    let mut attempts: Vec<Instant> = Vec::new();
    for at in proxy.faulted() {
        if attempts
            .last()
            .is_none_or(|first| at - *first > Duration::from_millis(200))
        {
            attempts.push(at);
        }
    }
    attempts
}

fn version(sequence: u64) -> String {
    format!("1.{sequence}.0")
}

/// Runs every case in turn against an agent whose current release is `sequence`.
fn survive(
    agent: &AgentProcess,
    proxy: &FaultProxy,
    cases: &[Case],
    mut sequence: u64,
    publish: &dyn Fn(u64),
    memory_growth: u64,
) -> u64 {
    let peak_before = peak_rss(agent);
    for case in cases {
        let (rejected, errors) = (
            agent.rejected_total(),
            agent.metric("outpost_source_errors_total"),
        );
        publish(sequence + 1);
        proxy.inject(case.fault, case.pattern);
        let status = eventually_within(90, &format!("{case:?} reported three times"), || {
            let status = agent.status();
            let error = status["source"]["last_error"].as_str().unwrap_or_default();
            let seen = proxy.faulted().len();
            let reported = agent.metric("outpost_source_errors_total") - errors;
            if error.contains(case.cause)
                && attempt_starts(proxy).len() >= case.attempts
                && reported >= 3
            {
                Ok(status)
            } else {
                Err(format!(
                    "{seen} faulted, {reported} reported; last error {error:?}"
                ))
            }
        });
        assert_eq!(status["current"]["sequence"], sequence, "{case:?}");
        let attempts = attempt_starts(proxy).len();
        assert!(attempts >= case.attempts, "{case:?}");
        if case.attempts == 1 {
            assert_eq!(attempts, 1, "{case:?}: one request at a time");
        }
        assert_eq!(
            agent.rejected_total(),
            rejected,
            "{case:?}: nothing rejected"
        );

        let asked = match case.fault {
            Fault::TooMany { retry_after } => Duration::from_secs(retry_after),
            _ => Duration::ZERO,
        };
        let floor = asked.max(Duration::from_millis(450));
        let stalls = matches!(case.fault, Fault::Drip);
        let ceiling = asked.max(INTERVAL) + if stalls { STALL } else { Duration::ZERO } + SLACK;
        let attempts = attempt_starts(proxy);
        for gap in attempts.windows(2).map(|w| w[1] - w[0]) {
            assert!(
                gap >= floor && gap <= ceiling,
                "{case:?}: retried after {gap:?}, outside {floor:?}..{ceiling:?}"
            );
        }

        proxy.clear();
        let cleared = Instant::now();
        agent.wait_current(sequence + 1);
        let took = cleared.elapsed();
        assert!(
            took <= asked.max(INTERVAL) + SLACK,
            "{case:?}: recovered {took:?} after the fault cleared"
        );
        sequence += 1;
        // The candidate's spool goes when the source settles it, just after it became current.
        eventually_within(5, &format!("{case:?}: state/tmp empty"), || {
            let left: Vec<_> = std::fs::read_dir(agent.path("state/tmp"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("left: {left:?}"))
            }
        });
    }
    let growth = peak_rss(agent).saturating_sub(peak_before);
    assert!(
        growth <= memory_growth,
        "peak RSS grew by {growth} bytes across the faults"
    );
    sequence
}

#[test]
fn registry_faults_leave_the_release_and_clear_within_an_interval() {
    let registry = TestRegistry::start(None);
    let proxy = FaultProxy::start(registry.port);
    let publish = |sequence: u64| {
        registry.push(
            &signed(release(&version(sequence), sequence), &BOTH),
            "stable",
        );
    };
    publish(1);
    let agent = AgentProcess::start(
        &format!(
            "source:\n  oci:\n    reference: {}/acme/shop:stable\n    interval: 2s\n    stall_timeout: 2s\n",
            proxy.host()
        ),
        "",
    );
    agent.wait_current(1);
    let blobs = "/blobs/";
    let cases = [
        case(Fault::Status(500), "", "HTTP 500"),
        case(Fault::Status(502), "", "HTTP 502"),
        case(Fault::Status(503), "", "HTTP 503"),
        case(
            Fault::TooMany { retry_after: 3 },
            "",
            "HTTP 429 (retry after 3s)",
        ),
        case(Fault::ResetMidBody, blobs, "reset"),
        case(Fault::ShortBody, blobs, "error decoding response body"),
        case(Fault::Drip, blobs, "stalled"),
        case(Fault::RedirectLoop, "", "too many redirects"),
        case(Fault::HugeHeader, "", "too large"),
        case(Fault::WrongContentType, "/manifests/", "not a manifest"),
    ];
    let sequence = survive(&agent, &proxy, &cases, 1, &publish, MEMORY_GROWTH);

    // The tag moves to another release between the agent's HEAD and its GETs: the agent
    // fetches what it looked at (by digest), then the new one on its next poll.
    let rejected = agent.rejected_total();
    publish(sequence + 1);
    let registry = &registry;
    let next = signed(release(&version(sequence + 2), sequence + 2), &BOTH);
    std::thread::scope(|scope| {
        let (moved, moved_seen) = std::sync::mpsc::channel();
        proxy.after_next("HEAD /v2/acme/shop/manifests/stable", move || {
            moved.send(()).unwrap();
        });
        // The hook only signals; the push runs here, while the proxy holds other requests.
        scope.spawn(move || {
            moved_seen.recv().unwrap();
            registry.push(&next, "stable");
        });
    });
    agent.wait_current(sequence + 2);
    let history = agent.cli(&["history", "-o", "json"]).stdout;
    assert!(
        history.contains(&version(sequence + 1)) && history.contains(&version(sequence + 2)),
        "both releases accepted in turn: {history}"
    );
    assert_eq!(agent.rejected_total(), rejected);
}

#[test]
fn git_smart_http_faults_leave_the_release_and_clear_within_an_interval() {
    let vendor = VendorRepo::new();
    let (_server, port) = git_http(vendor.root.path(), "");
    let proxy = FaultProxy::start(port);
    let publish = |sequence: u64| {
        let layout = signed(release(&version(sequence), sequence), &BOTH);
        vendor.publish(&tar(&layout), &version(sequence));
    };
    publish(1);
    let agent = AgentProcess::start(
        &format!(
            "source:\n  git:\n    url: http://{}/vendor.git\n    ref: main\n    path: outpost/bundle.tar\n    interval: 2s\n    stall_timeout: 2s\n",
            proxy.host()
        ),
        "",
    );
    agent.wait_current(1);
    let pack = "POST ";
    let cases = [
        case(Fault::Status(500), "", "500"),
        case(Fault::Status(502), "", "502"),
        case(Fault::Status(503), "", "503"),
        // libgit2 does not expose `Retry-After`: its 429 is retried like any other status.
        case(Fault::TooMany { retry_after: 0 }, "", "429"),
        case(Fault::ResetMidBody, pack, "reset"),
        case(Fault::ShortBody, pack, "EOF"),
        // The stalled fetch is reported at each retry and waited for, never run twice at once.
        Case {
            attempts: 1,
            ..case(Fault::Drip, pack, "stalled")
        },
        case(Fault::RedirectLoop, "", "redirect"),
        case(Fault::HugeHeader, "", "header"),
        case(Fault::WrongContentType, "GET ", "content-type"),
    ];
    survive(&agent, &proxy, &cases, 1, &publish, MEMORY_GROWTH_LIBGIT2);
}
