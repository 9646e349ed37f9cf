//! Rebuild the BPF object when bpf-linker changes (a new LLVM can change codegen).
//! aya-build in pxe-user/build.rs drives the actual compilation.
fn main() {
    let linker = which::which("bpf-linker").expect(
        "bpf-linker not found in PATH: run `cargo xtask setup` (it installs bpf-linker 0.13 against llvm-22)",
    );
    println!(
        "cargo:rerun-if-changed={}",
        linker.to_str().expect("bpf-linker path is not UTF-8")
    );
}
