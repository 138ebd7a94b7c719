//! Consumer groups: the per-group delivery state machine (pure, takes `now`), its journal
//! events and snapshots, and the range set that keeps done offsets compact.

pub mod event;
pub mod ranges;
pub mod state;

pub use event::{Event, Snapshot};
pub use state::{
    Candidate, Expired, Grant, GroupConfig, GroupError, GroupState, Ordering, Outcome, Reason,
};
