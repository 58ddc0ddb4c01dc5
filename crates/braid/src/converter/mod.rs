//! `braid converter`: the RFC 8803 Transport Converter daemon.
//!
//! - [`config`]: file + flags → validated settings.
//! - [`policy`]: which clients and destinations are allowed.

pub mod config;
pub mod cookie;
pub mod policy;
pub mod upstream;
