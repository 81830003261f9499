//! WatchOrder's stream: the order now, then each change of its status, ending after a final
//! status (PAYMENT_FAILED or CANCELLED), when the client goes away, or at server shutdown.
//!
//! Another replica sharing the database may make the change, so the stream polls the database
//! every [`POLL_INTERVAL`]; a change made by this process wakes it at once.

use std::time::Duration;

use meshwork::orders::v1::WatchOrderResponse;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::{domain::Order, error::DomainError, store::Store};

/// How often a watch reads the order again: short enough that a change made by another replica
/// shows within a blink, long enough that a few hundred watches cost the database little.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Messages queued for a slow client. A watch sends at most four (PENDING, PAID, a final status
/// or an error), so sending never waits.
const STREAM_BUFFER: usize = 4;

/// The stream WatchOrder returns.
pub type OrderUpdates = ReceiverStream<Result<WatchOrderResponse, Status>>;

/// Starts watching `order` (just read from `store`); `shutdown` turns true when the server stops.
pub fn start(store: Store, order: Order, shutdown: watch::Receiver<bool>) -> OrderUpdates {
    let (updates, stream) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(follow(store, order, updates, shutdown));
    ReceiverStream::new(stream)
}

type Updates = mpsc::Sender<Result<WatchOrderResponse, Status>>;

async fn follow(
    store: Store,
    mut last: Order,
    updates: Updates,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    if !deliver(&updates, &last).await {
        return;
    }
    while !last.status.is_final() {
        let stopping = tokio::select! {
            () = updates.closed() => return,
            // The guard `wait_for` returns is dropped here: it must not live across an await.
            _ = shutdown.wait_for(|stopping| *stopping) => true,
            Ok(()) = changes.changed() => false,
            () = tokio::time::sleep(POLL_INTERVAL) => false,
        };
        if stopping {
            let _ = updates.send(Err(DomainError::ShuttingDown.into())).await;
            return;
        }
        let current = match store.get(&last.id).await {
            Ok(Some(current)) => current,
            Ok(None) => {
                let _ = updates
                    .send(Err(DomainError::OrderNotFound(last.id).into()))
                    .await;
                return;
            }
            Err(error) => {
                let _ = updates.send(Err(error.into())).await;
                return;
            }
        };
        if current.status != last.status {
            if !deliver(&updates, &current).await {
                return;
            }
            last = current;
        }
    }
}

/// Sends `order`; `false` when the client went away.
async fn deliver(updates: &Updates, order: &Order) -> bool {
    let message = WatchOrderResponse {
        order: Some(order.to_proto()),
    };
    updates.send(Ok(message)).await.is_ok()
}
