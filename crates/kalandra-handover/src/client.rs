//! A client's view of one frame it submitted to its home server: how long
//! to wait before sending it again when the room is moving, and when to
//! stop. A client never needs to know which domain sequences its room: its
//! home server routes, and a handover shows up as retryable refusals for
//! the length of the pause.

use crate::ids::{Generation, LogIndex};
use crate::limits::{CLIENT_ATTEMPTS_MAX, CLIENT_RETRY_DELAY_INITIAL_MS, CLIENT_RETRY_DELAY_MAX_MS};
use crate::message::Refusal;

/// Where a submitted frame stands.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Submission {
    /// Sent `attempts` times, not yet answered.
    Pending {
        /// Sends so far (at least 1).
        attempts: u32,
    },
    /// Sequenced durably.
    Acknowledged {
        /// Where.
        index: LogIndex,
        /// By which generation.
        generation: Generation,
    },
    /// Refused for good: the refusal was not retryable, or the attempts ran out.
    Failed(Refusal),
}

/// What the client does after an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing more to do for this frame.
    Done,
    /// Send the same frame again after this many milliseconds.
    ResendAfterMs(u64),
}

impl Submission {
    /// A frame sent once.
    pub fn sent() -> Submission {
        Submission::Pending { attempts: 1 }
    }

    /// The home server acknowledged the frame.
    pub fn on_acknowledged(&mut self, index: LogIndex, generation: Generation) -> Next {
        *self = Submission::Acknowledged { index, generation };
        Next::Done
    }

    /// The home server refused the frame.
    pub fn on_refused(&mut self, refusal: Refusal) -> Next {
        let Submission::Pending { attempts } = *self else {
            return Next::Done; // A late answer to a settled frame.
        };
        if !refusal.is_retryable() || attempts >= CLIENT_ATTEMPTS_MAX {
            *self = Submission::Failed(refusal);
            return Next::Done;
        }
        *self = Submission::Pending { attempts: attempts + 1 };
        Next::ResendAfterMs(retry_delay_ms(attempts))
    }
}

/// The wait before the resend that follows `attempts` sends: doubling from
/// [`CLIENT_RETRY_DELAY_INITIAL_MS`] up to [`CLIENT_RETRY_DELAY_MAX_MS`].
/// Jitter, where wanted, is the driver's (it holds the random source).
pub fn retry_delay_ms(attempts: u32) -> u64 {
    let doublings = attempts.saturating_sub(1).min(16);
    CLIENT_RETRY_DELAY_INITIAL_MS.saturating_mul(1 << doublings).min(CLIENT_RETRY_DELAY_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DomainId;

    #[test]
    fn a_moving_room_is_retried_with_backoff_until_acknowledged() {
        let moving = Refusal::Moving { to: DomainId::from_name("b.example"), generation: Generation(1) };
        let mut submission = Submission::sent();
        assert_eq!(submission.on_refused(moving.clone()), Next::ResendAfterMs(25));
        assert_eq!(submission.on_refused(moving.clone()), Next::ResendAfterMs(50));
        assert_eq!(submission.on_refused(moving), Next::ResendAfterMs(100));
        assert_eq!(submission.on_acknowledged(LogIndex(9), Generation(1)), Next::Done);
        assert_eq!(submission, Submission::Acknowledged { index: LogIndex(9), generation: Generation(1) });
    }

    #[test]
    fn a_rejected_frame_is_not_retried_and_attempts_are_bounded() {
        let mut rejected = Submission::sent();
        assert_eq!(rejected.on_refused(Refusal::Rejected { code: 2001 }), Next::Done);
        assert!(matches!(rejected, Submission::Failed(_)));

        let stale = Refusal::RouteStale { generation: Generation(2) };
        let mut submission = Submission::sent();
        let mut resends = 0;
        while let Next::ResendAfterMs(delay) = submission.on_refused(stale.clone()) {
            assert!(delay <= CLIENT_RETRY_DELAY_MAX_MS);
            resends += 1;
        }
        assert_eq!(resends, CLIENT_ATTEMPTS_MAX - 1);
        assert_eq!(submission, Submission::Failed(stale));
    }
}
