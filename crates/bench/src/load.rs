//! The load generator: drives one kind of call (a [`Call`]) over HTTP/2 with many concurrent
//! streams, three ways:
//!
//! - [`closed`]: `concurrency` callers, each sending its next call as soon as the last one
//!   answered: the most the target can serve (requests/s);
//! - [`open`]: calls sent at a fixed rate whatever the target does, each timed from the instant
//!   it was *scheduled* to start, so that a stall shows in the latency of every call it delayed
//!   (no coordinated omission). Pacing cannot lean on tokio's timer alone (millisecond wheel:
//!   it would add up to a millisecond to every call): the pacer sleeps on the timer only while
//!   the next call is more than [`COARSE_PACING`] away and then yields to the runtime until the
//!   instant, so the connections' I/O keeps being driven while it waits;
//! - [`sequential`]: one call at a time, the round trip the open loop's low-rate p50 must be
//!   close to.
//!
//! Every non-OK status is counted, by code; a call that does not answer within [`CALL_TIMEOUT`]
//! counts as DEADLINE_EXCEEDED. Latencies go into an HDR histogram (3 significant digits).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::Code;

/// One call of the kind under test; the argument numbers the call (0, 1, 2...), for requests
/// that must differ (ids to look up, idempotency keys).
pub type Call = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<(), Code>> + Send + Sync>;

/// How long a call may take before the generator gives up on it (counted as an error).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Within this of the next call's start the pacer stops sleeping on the timer and yields.
pub const COARSE_PACING: Duration = Duration::from_millis(2);
/// Latencies above this are recorded as this (a histogram needs a bound).
const HIGHEST_NANOS: u64 = 60_000_000_000;

/// What one phase of load measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    histogram: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// The measured window (warm-up excluded).
    window: Duration,
    /// The rate calls were sent at (open loop only).
    offered: Option<f64>,
    /// How late each call was sent (open loop only).
    send_late: Option<Histogram<u64>>,
}

/// An [`Outcome`] as numbers, for the report.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    /// Calls sent per second (open loop), `None` for closed loops.
    pub offered_rps: Option<f64>,
    /// Calls answered (OK or not) per second of the window.
    pub rps: f64,
    pub calls: u64,
    pub errors: u64,
    /// Non-OK calls by gRPC code name.
    pub errors_by_code: BTreeMap<String, u64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Open loop: how late the generator sent calls, at p99. Beyond a millisecond it could not
    /// keep the schedule (its CPU was the limit) and the latencies include its own backlog.
    #[serde(default)]
    pub send_late_p99_us: Option<f64>,
}

impl Outcome {
    fn new(window: Duration, offered: Option<f64>) -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Histogram::new_with_bounds(1, HIGHEST_NANOS, 3)?,
            ok: 0,
            errors: BTreeMap::new(),
            window,
            offered,
            send_late: None,
        })
    }

    fn record(&mut self, latency: Duration, result: Result<(), Code>) {
        self.histogram.saturating_record(nanos(latency));
        match result {
            Ok(()) => self.ok += 1,
            Err(code) => *self.errors.entry(code_name(code)).or_default() += 1,
        }
    }

    pub fn calls(&self) -> u64 {
        self.histogram.len()
    }

    pub fn summary(&self) -> Summary {
        let micros = |nanos: u64| nanos as f64 / 1_000.0;
        let calls = self.histogram.len();
        let quantile = |q: f64| {
            if calls == 0 {
                0.0
            } else {
                micros(self.histogram.value_at_quantile(q))
            }
        };
        Summary {
            offered_rps: self.offered,
            rps: calls as f64 / self.window.as_secs_f64(),
            calls,
            errors: self.errors.values().sum(),
            errors_by_code: self.errors.clone(),
            p50_us: quantile(0.5),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            max_us: if calls == 0 {
                0.0
            } else {
                micros(self.histogram.max())
            },
            mean_us: if calls == 0 {
                0.0
            } else {
                self.histogram.mean() / 1_000.0
            },
            send_late_p99_us: self
                .send_late
                .as_ref()
                .filter(|late| !late.is_empty())
                .map(|late| micros(late.value_at_quantile(0.99))),
        }
    }
}

/// `duration` in nanoseconds, within the histograms' bounds.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos())
        .unwrap_or(HIGHEST_NANOS)
        .clamp(1, HIGHEST_NANOS)
}

/// The gRPC name of `code` (`UNAVAILABLE`), as in the specification and the metrics.
pub fn code_name(code: Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let underscore = (i > 0 && c.is_ascii_uppercase()).then_some('_');
            underscore
                .into_iter()
                .chain(std::iter::once(c.to_ascii_uppercase()))
        })
        .collect()
}

fn lock(outcome: &Mutex<Outcome>) -> std::sync::MutexGuard<'_, Outcome> {
    outcome
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn timed(call: &Call, n: u64) -> Result<(), Code> {
    match tokio::time::timeout(CALL_TIMEOUT, call(n)).await {
        Ok(result) => result,
        Err(_) => Err(Code::DeadlineExceeded),
    }
}

/// `concurrency` callers back to back for `warmup` (not measured), then `duration`: every call
/// that starts inside the window is measured.
pub async fn closed(
    call: Call,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let outcome = Arc::new(Mutex::new(Outcome::new(duration, None)?));
    let counter = Arc::new(AtomicU64::new(0));
    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let mut callers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (call, outcome, counter) = (call.clone(), outcome.clone(), counter.clone());
        callers.spawn(async move {
            loop {
                let start = Instant::now();
                if start >= end {
                    break;
                }
                let result = timed(&call, counter.fetch_add(1, Ordering::Relaxed)).await;
                if start >= measure_from {
                    lock(&outcome).record(start.elapsed(), result);
                }
            }
        });
    }
    while callers.join_next().await.is_some() {}
    let outcome = lock(&outcome).clone();
    Ok(outcome)
}

/// One call at a time for `duration` (after one warm-up call).
pub async fn sequential(call: Call, duration: Duration) -> anyhow::Result<Outcome> {
    let _ = timed(&call, u64::MAX).await;
    closed(call, 1, Duration::ZERO, duration).await
}

/// Waits until `instant`: on the timer while it is far, then yielding to the runtime (which
/// keeps polling I/O and the calls in flight) until it has come.
pub async fn pace_until(instant: Instant) {
    loop {
        let now = Instant::now();
        if now >= instant {
            return;
        }
        let left = instant - now;
        if left > COARSE_PACING {
            tokio::time::sleep(left - COARSE_PACING).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// Calls at `rate` per second for `warmup` (not measured) and then `duration`; each call's
/// latency runs from its scheduled start. Waits for the last calls to answer.
///
/// The calls run inside this one task (no task spawned per call: the generator has one CPU,
/// and every microsecond it spends is a call it cannot send on time). How late each call was
/// sent is recorded apart ([`Summary::send_late_p99_us`]): when the generator cannot keep the
/// schedule, the latencies include its own backlog, and the report says so.
pub async fn open(
    call: Call,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        rate.is_finite() && rate > 0.0,
        "rate must be positive, not {rate}"
    );
    let mut outcome = Outcome::new(duration, Some(rate))?;
    let mut send_late = Histogram::<u64>::new_with_bounds(1, HIGHEST_NANOS, 3)?;
    let interval_nanos = 1e9 / rate;
    let warmup_calls = (warmup.as_secs_f64() * rate).round() as u64;
    let total = warmup_calls + (duration.as_secs_f64() * rate).round() as u64;
    let start = Instant::now() + COARSE_PACING;
    let scheduled_at = |n: u64| start + Duration::from_nanos((n as f64 * interval_nanos) as u64);
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0u64;
    while next < total || !in_flight.is_empty() {
        // Send every call whose time has come.
        let now = Instant::now();
        while next < total && scheduled_at(next) <= now {
            let (n, scheduled) = (next, scheduled_at(next));
            let call = call.clone();
            in_flight.push(async move {
                // The call is sent when its future is first polled: that is how late it went.
                let sent = Instant::now();
                let result = timed(&call, n).await;
                (n, scheduled, sent, result)
            });
            next += 1;
        }
        let wake = (next < total).then(|| scheduled_at(next));
        tokio::select! {
            biased;
            Some((n, scheduled, sent, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if n >= warmup_calls {
                    outcome.record(scheduled.elapsed(), result);
                    send_late.saturating_record(nanos(sent.saturating_duration_since(scheduled)));
                }
            }
            () = pace_until(wake.unwrap_or(now)), if wake.is_some() => {}
        }
    }
    outcome.send_late = Some(send_late);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These tests time the pacer against the clock: one at a time, so that they do not take
    /// each other's CPU on a small machine.
    static TIMING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn sleeping(delay: Duration) -> Call {
        Arc::new(move |_| {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(())
            })
        })
    }

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Ok), "OK");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_open_loop_keeps_its_rate_and_counts_failures() -> anyhow::Result<()> {
        let _one_at_a_time = TIMING.lock().await;
        let call: Call = Arc::new(|n| {
            Box::pin(async move {
                if n % 10 == 0 {
                    Err(Code::Unavailable)
                } else {
                    Ok(())
                }
            })
        });
        let started = Instant::now();
        let outcome = open(
            call,
            2_000.0,
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .await?
        .summary();
        let took = started.elapsed();
        assert_eq!(outcome.calls, 2_000);
        assert_eq!(outcome.errors_by_code.get("UNAVAILABLE"), Some(&200));
        // Loosely: keeping the schedule is microseconds late; falling behind grows without end.
        let late = outcome.send_late_p99_us.unwrap_or(f64::MAX);
        assert!(late < 20_000.0, "calls sent {late} us late at p99");
        assert!(
            took >= Duration::from_millis(1_090) && took < Duration::from_secs(3),
            "2,200 calls at 2,000/s took {took:?}"
        );
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pacing_is_finer_than_the_timer() -> anyhow::Result<()> {
        let _one_at_a_time = TIMING.lock().await;
        // An instant call paced at 5,000/s: scheduled 200 us apart, so each one's latency is
        // only how late the pacer released it. A timer-only pacer is up to a millisecond late.
        let call: Call = Arc::new(|_| Box::pin(async { Ok(()) }));
        let outcome = open(
            call,
            5_000.0,
            Duration::from_millis(100),
            Duration::from_millis(500),
        )
        .await?
        .summary();
        assert!(outcome.p50_us < 300.0, "p50 lateness {} us", outcome.p50_us);
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_generator_that_cannot_keep_the_schedule_says_so() -> anyhow::Result<()> {
        let _one_at_a_time = TIMING.lock().await;
        // Each call holds the generator's only thread for 1 ms, and calls are due every 0.5 ms:
        // it falls further behind with every call, and its send lateness must show it.
        let call: Call = Arc::new(|_| {
            Box::pin(async {
                std::thread::sleep(Duration::from_millis(1));
                Ok(())
            })
        });
        let outcome = open(call, 2_000.0, Duration::ZERO, Duration::from_millis(200))
            .await?
            .summary();
        let late = outcome.send_late_p99_us.unwrap_or(0.0);
        assert!(late > 50_000.0, "calls sent only {late} us late at p99");
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stall_shows_in_the_calls_it_delayed() -> anyhow::Result<()> {
        let _one_at_a_time = TIMING.lock().await;
        // One call in the middle takes 200 ms, and the target serves one call at a time: in an
        // open loop every call scheduled during the stall waited for it, so about 200 ms x
        // 1,000/s = 200 of the 1,000 calls are late by up to 200 ms; p99 must show it. (A closed
        // loop, or timing from the actual send, would report one slow call.)
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let call: Call = Arc::new(move |n| {
            let gate = gate.clone();
            Box::pin(async move {
                let _one_at_a_time = gate.lock().await;
                if n == 500 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(())
            })
        });
        let outcome = open(call, 1_000.0, Duration::ZERO, Duration::from_secs(1))
            .await?
            .summary();
        assert!(outcome.p99_us > 150_000.0, "p99 {} us", outcome.p99_us);
        assert!(outcome.p50_us < 1_000.0, "p50 {} us", outcome.p50_us);
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_closed_loop_is_bounded_by_concurrency_over_latency() -> anyhow::Result<()> {
        let _one_at_a_time = TIMING.lock().await;
        // 4 callers, 10 ms a call: at most 400 calls/s.
        let outcome = closed(
            sleeping(Duration::from_millis(10)),
            4,
            Duration::from_millis(50),
            Duration::from_millis(500),
        )
        .await?
        .summary();
        assert!(
            outcome.rps > 250.0 && outcome.rps <= 410.0,
            "{} calls/s",
            outcome.rps
        );
        assert!(outcome.p50_us >= 10_000.0, "p50 {} us", outcome.p50_us);
        assert_eq!(outcome.errors, 0);
        Ok(())
    }
}
