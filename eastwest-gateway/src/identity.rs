//! Standalone identity of the gateway: files re-read on change, or a trust broker. The
//! implementation is shared with the other components in [`isthmus_api::identity`].

pub use isthmus_api::identity::{IdentityError, POLL_INTERVAL, from_broker, load, watch};
