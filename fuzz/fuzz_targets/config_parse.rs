//! Any text as a config file: never a panic, and every refusal names a
//! place inside the text (line and column counted from 1), so an operator's
//! typo is always pointed at.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pxe_user::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::parse(Path::new("fuzz.toml"), text) {
        let lines = text.split('\n').count();
        assert!(e.line <= lines, "line {} of {lines}: {e}", e.line);
        assert!(!e.message.is_empty());
    }
});
