//! One module per mode; each owns its options (`…Args`, parsed by clap), its run, and
//! the checks it ends with.

pub mod ceiling;
pub mod flood;
pub mod holds;
pub mod load;
pub mod queue;
