//! Any datagram through the TFTP parser: never a panic, and whatever parses
//! emits back to bytes that parse to the same packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pxe_user::wire::tftp::Repr;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Repr::parse(data) {
        let bytes = packet.to_vec();
        assert_eq!(Repr::parse(&bytes), Ok(packet));
    }
});
