//! Cluster mode: several nodes act as one, each ticket consumed at most once.
//!
//! Every ticket has a home node, the node that issued it, encoded in the
//! ticket ([`home`]).

pub mod home;
