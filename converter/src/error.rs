//! Error helpers shared by the modules: the text of an error with its sources, for logs and
//! reports (the binary prints chains with anyhow). The one implementation is the workspace's.

pub use rehost_proto::error::chain;
