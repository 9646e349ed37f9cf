//! Exists so `pxe-user` can list this crate as a build-dependency: cargo can only
//! depend on crates with a library target, and the dependency is what makes a
//! change here rebuild the daemon's embedded BPF object.
#![no_std]
