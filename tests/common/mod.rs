//! Test harness, one module per concern: the local stack (`stack`), OpenBao servers of a
//! test's own (`vault_servers`), PostgreSQL, Redis, Kafka, certificates and servers of a
//! test's own that check them (`certs`), fault servers (`faults`), the
//! one query-load harness (`load`) and the scenarios every pool flavour must pass
//! (`scenarios`). `use common::*;` brings all of it.
#![allow(dead_code, unreachable_pub)]

pub mod auth;
pub mod certs;
pub mod faults;
pub mod kafka;
pub mod load;
pub mod postgres;
pub mod redis;
pub mod scenarios;
pub mod stack;
pub mod vault_servers;

// Each test binary uses a part of the harness; the rest is unused there.
#[allow(unused_imports)]
pub use {
    auth::*, certs::*, faults::*, kafka::*, load::*, postgres::*, redis::*, stack::*,
    vault_servers::*,
};

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vaultpool::vault::{Client, ClientBuilder};
