//! The systemd watchdog (`WatchdogSec=`): `WATCHDOG=1` is sent only while
//! the pipeline proves it is alive, so systemd restarts a daemon that runs
//! but is stuck, not only one that died.
//!
//! Every quarter of the period a probe must come back within half a period
//! to earn a ping. The daemon's probe ([`crate::daemon`]) asks the outbox
//! writer thread — the one every acknowledged reading passes through — to
//! answer through its command queue ([`sluice_cloud_sync::Outbox::ping`]),
//! and fails at once when a long-lived task (a listener, the uplink…) has
//! ended. A writer stuck in a commit (a hung disk, a lock-up) answers
//! nothing, the pings stop, and systemd kills and restarts the service
//! after `WatchdogSec` (the state is on disk). A stall shorter than about
//! three quarters of the period (a slow fsync) costs no restart: the pings
//! resume when the writer does.
//!
//! ```no_run
//! # async fn f(outbox: sluice_cloud_sync::Outbox, cancel: tokio_util::sync::CancellationToken) {
//! if let Some(period) = sd_notify::watchdog_enabled() {
//!     let probe = move || {
//!         let outbox = outbox.clone();
//!         async move { outbox.ping().await.map_err(|e| e.to_string()) }
//!     };
//!     let ping = || {
//!         let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
//!     };
//!     tokio::spawn(sluice_agent::watchdog::run(period, probe, ping, cancel));
//! }
//! # }
//! ```

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Probes every `period / 4` and calls `ping` each time `probe` succeeds
/// within `period / 2`; until `cancel`. A failed or late probe is logged
/// (once, until the next success) and earns no ping.
pub async fn run<P, F>(
    period: Duration,
    mut probe: P,
    mut ping: impl FnMut(),
    cancel: CancellationToken,
) where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let answer_within = period / 2;
    let mut tick = tokio::time::interval((period / 4).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let verdict = tokio::select! {
            () = cancel.cancelled() => break,
            r = tokio::time::timeout(answer_within, probe()) => r,
        };
        match verdict {
            Ok(Ok(())) => {
                ping();
                if withheld {
                    withheld = false;
                    tracing::info!("the pipeline answers again: watchdog pings resumed");
                }
            }
            Ok(Err(why)) => {
                if !withheld {
                    withheld = true;
                    tracing::error!(reason = %why, "the pipeline is not alive: withholding the systemd watchdog ping");
                }
            }
            Err(_) => {
                if !withheld {
                    withheld = true;
                    tracing::error!(
                        waited_ms = answer_within.as_millis() as u64,
                        "the outbox writer did not answer: withholding the systemd watchdog ping"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn pings_stop_while_the_probe_hangs_or_fails_and_resume_after() {
        let period = Duration::from_millis(400);
        let pings = Arc::new(AtomicUsize::new(0));
        // 0: answers, 1: hangs, 2: fails.
        let mode = Arc::new(AtomicUsize::new(0));
        let probe = {
            let mode = mode.clone();
            move || {
                let m = mode.load(Ordering::SeqCst);
                async move {
                    match m {
                        0 => Ok(()),
                        1 => std::future::pending().await,
                        _ => Err("a long-lived task ended".to_string()),
                    }
                }
            }
        };
        let ping = {
            let pings = pings.clone();
            move || {
                pings.fetch_add(1, Ordering::SeqCst);
            }
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(period, probe, ping, cancel.clone()));
        let count = || pings.load(Ordering::SeqCst);

        tokio::time::sleep(Duration::from_millis(1050)).await;
        let alive = count();
        assert!(
            (10..=12).contains(&alive),
            "{alive} pings in 1 s of 400 ms periods"
        );

        mode.store(1, Ordering::SeqCst);
        // A probe already answered may still ping once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let frozen = count();
        assert!(frozen <= alive + 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(count(), frozen, "no ping while the probe hangs");

        mode.store(0, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let resumed = count();
        assert!(resumed >= frozen + 5, "pings resume: {frozen} → {resumed}");

        mode.store(2, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let failed = count();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count(), failed, "no ping while the probe fails");

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn slow_answers_within_half_a_period_keep_pings_closer_than_a_period() {
        let period = Duration::from_millis(400);
        let pings = Arc::new(std::sync::Mutex::new(Vec::new()));
        let probe = || async {
            tokio::time::sleep(Duration::from_millis(190)).await;
            Ok(())
        };
        let ping = {
            let pings = pings.clone();
            move || pings.lock().unwrap().push(tokio::time::Instant::now())
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(period, probe, ping, cancel.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let times = pings.lock().unwrap().clone();
        assert!(times.len() >= 10, "{} pings in 3 s", times.len());
        let widest = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(widest < period, "{widest:?} between two pings");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }
}
