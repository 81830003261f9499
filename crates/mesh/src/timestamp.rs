//! Time as the contracts carry it: stored as milliseconds since the Unix epoch (portable across
//! SQLite and PostgreSQL), sent as `google.protobuf.Timestamp`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A stored millisecond instant as a protobuf `Timestamp`.
pub fn from_millis(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        // The remainder is below 1000, so the product is below 1e9 and fits an i32.
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_become_seconds_and_nanos() {
        let ts = from_millis(1_700_000_000_123);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_000_000));
    }

    #[test]
    fn negative_millis_stay_normalised() {
        let ts = from_millis(-1);
        assert_eq!((ts.seconds, ts.nanos), (-1, 999_000_000));
    }
}
