//! A set of namespaces that live and die together. Dropping a [`Lab`] (also while unwinding
//! from a panic) deletes every namespace it made; creating one first sweeps leftovers of
//! crashed runs.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::Result;
use crate::link::Link;
use crate::netns::{Netns, sweep};

/// Owner of a set of namespaces; build any topology with [`Lab::add_ns`] and [`Lab::link`].
///
/// ```no_run
/// # fn main() -> braid_lab::Result<()> {
/// let lab = braid_lab::Lab::new()?;
/// let a = lab.add_ns("a")?;
/// let b = lab.add_ns("b")?;
/// let link = lab.link(&a, "a-b", &b, "b-a")?;
/// link.a.add_addr("192.168.7.1/24".parse().unwrap())?;
/// link.b.add_addr("192.168.7.2/24".parse().unwrap())?;
/// a.run(["ip", "route", "get", "192.168.7.2"])?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Lab {
    namespaces: Mutex<Vec<Netns>>,
}

impl Lab {
    /// An empty lab. Sweeps leftovers of dead runs first (see [`sweep`]).
    pub fn new() -> Result<Lab> {
        match sweep() {
            Ok(v) if !v.is_empty() => tracing::info!(removed = ?v, "swept leftover namespaces"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
        Ok(Lab {
            namespaces: Mutex::new(Vec::new()),
        })
    }

    /// Creates a namespace owned by this lab; see [`Netns::create`] for `role`.
    pub fn add_ns(&self, role: &str) -> Result<Netns> {
        let ns = Netns::create(role)?;
        self.list().push(ns.clone());
        Ok(ns)
    }

    /// Creates a veth link between two namespaces; see [`Link::create`].
    pub fn link(&self, a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<Link> {
        Link::create(a, a_if, b, b_if)
    }

    /// The namespaces, in creation order.
    pub fn namespaces(&self) -> Vec<Netns> {
        self.list().clone()
    }

    fn list(&self) -> MutexGuard<'_, Vec<Netns>> {
        // The list stays valid even if a holder panicked; cleanup must still see it.
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let list = std::mem::take(&mut *self.list());
        for ns in list.iter().rev() {
            if let Err(e) = ns.delete() {
                tracing::warn!(ns = %ns, error = %e, "could not delete namespace");
            }
        }
    }
}
