//! FleetDB's domain: the data model, validation, errors, the clock and the storage contract.
//!
//! Architecture invariant: this crate knows no driver and no wire format. Backends and the wire
//! sit around it and translate; the decisions (what a write does, what is valid) are made here.

pub mod apply;
pub mod backend;
pub mod batch;
pub mod content;
pub mod error;
pub mod gc;
mod gc_apply;
pub mod model;
pub mod query;
pub mod selector;
pub mod time;
pub mod validate;
pub mod work;
pub mod world;
mod world_apply;

pub use backend::{Backend, Capabilities, Migration, RevisionInfo, SchemaStatus};
pub use batch::{Applied, Batch, Limits, Op, OpResult, Precondition, PutMode};
pub use error::{Error, Result};
pub use model::*;
pub use query::{parse_label_selector, LabelRequirement, ObjectCursor, ObjectQuery};
pub use time::{Clock, ClockSample, ManualClock, SampleUse, ServerClock, SystemClock, Timestamp};
