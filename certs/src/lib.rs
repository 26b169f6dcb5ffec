//! Mesh CA and certificate handling.
//!
//! `TlsFiles` is the on-disk triple (CA, certificate, key) every mTLS client and server of the
//! mesh is configured with. Files are read each time a config is built, so rotated files are
//! picked up by the next connection without a restart.

mod client;

pub use client::{CertError, TlsFiles};
