//! Retrying etcd requests that a replicated etcd refuses for a moment.
//!
//! While a 3-member etcd elects a new leader (its leader died, or was cut off), members answer
//! requests with `Unavailable` ("etcdserver: leader changed", "etcdserver: no leader"), and a
//! request sent over a connection to the member that just died fails at the transport. Both
//! pass within an election timeout (1 s by default) or a reconnect to another member, so a
//! caller that gives up at once turns a routine failover into an error the user sees (an
//! endpoint add refused, found by the e2e test that kills the leader during a burst). etcd's
//! own Go client retries such requests when they are safe to repeat; so does this helper, for
//! reads and for transactions guarded by a compare (which cannot apply twice).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// True for failures that another attempt, shortly after, may not see: `Unavailable` from the
/// server (no leader, leader changed, member stopping) and transport failures (the connection
/// to the member broke, the next request dials another).
pub fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable => true,
            // A request on a connection that broke under it (the member was killed) ends as
            // "Unknown: transport error" or "Cancelled: connection closed", with the I/O error
            // as its source. Not sent, or sent and lost: either way only safe requests retry.
            tonic::Code::Unknown | tonic::Code::Cancelled => broken_connection(status),
            _ => false,
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// True when the status was made from a transport or I/O error.
fn broken_connection(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// First pause between attempts; doubled up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Runs `attempt` until it succeeds, fails with an error that is not transient, or `budget`
/// has passed (then the last error is returned). Only for requests that are safe to repeat.
pub async fn retry_transient<T, F, Fut>(
    budget: Duration,
    mut attempt: F,
) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + budget;
    let mut pause = FIRST_PAUSE;
    loop {
        match attempt().await {
            Err(e) if is_transient(&e) && Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, retry_in = ?pause, "etcd request refused for now; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn unavailable() -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: leader changed"))
    }

    #[test]
    fn a_request_lost_with_its_connection_is_transient_other_unknowns_are_not() {
        let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed connection");
        let lost = tonic::Status::from_error(Box::new(io));
        assert_eq!(lost.code(), tonic::Code::Unknown);
        assert!(is_transient(&etcd_client::Error::GRpcStatus(lost)));
        let unknown = tonic::Status::unknown("something else");
        assert!(!is_transient(&etcd_client::Error::GRpcStatus(unknown)));
        assert!(is_transient(&unavailable()));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let r = retry_transient(Duration::from_secs(10), || async {
            if calls.fetch_add(1, Ordering::Relaxed) < 3 {
                Err(unavailable())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_and_an_exhausted_budget_end_the_retries() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry_transient(Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(etcd_client::Error::GRpcStatus(
                tonic::Status::permission_denied("etcdserver: permission denied"),
            ))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "permission denied is final"
        );

        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry_transient(Duration::from_secs(3), || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(unavailable())
        })
        .await;
        assert!(r.is_err(), "gives up after its budget");
        let n = calls.load(Ordering::Relaxed);
        assert!(
            (3..=8).contains(&n),
            "{n} attempts in 3 s of 50 ms .. 1 s pauses"
        );
    }
}
