//! Types shared by the kernel programs (`pxe-ebpf`) and the daemon (`pxe-user`).
//!
//! Everything here is `#[repr(C)]` plain old data (`bytemuck::Pod`), multi-byte
//! network fields are byte arrays in network order, and padding is written out.
//! This crate is the single definition of every layout that crosses the
//! kernel/userspace boundary: there is no second copy to keep in sync.
#![no_std]

pub mod admit;
pub mod consts;
pub mod counter;
pub mod csum;
pub mod dhcp;
pub mod hdr;
pub mod maps;

/// Implements `aya::Pod` for types that already prove they are plain old data
/// through `bytemuck::Pod` (repr(C), no padding, every bit pattern valid).
#[macro_export]
macro_rules! impl_aya_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the bound below requires `bytemuck::Pod`, whose derive proves the
            // type is repr(C) without padding and valid for any bit pattern.
            unsafe impl aya::Pod for $ty where $ty: bytemuck::Pod {}
        )+
    };
}
