//! Compiles `pxe-ebpf` for the BPF target with aya-build and leaves the object
//! in OUT_DIR, where `include_bytes_aligned!` embeds it in `pxed`. Needs the
//! nightly toolchain with rust-src and bpf-linker: `cargo xtask setup`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../pxe-ebpf");
    let package = Package {
        name: "pxe-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
        .map_err(|e| anyhow!("{e:#}"))
        .context("building the BPF programs failed; `cargo xtask setup` installs what they need (nightly rust-src, bpf-linker)")
}
