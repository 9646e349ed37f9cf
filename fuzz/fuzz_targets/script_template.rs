//! Any text as an iPXE script template: checking and rendering never panic;
//! rendering a template the check accepted asks only for variables the check
//! knows, and leaves everything outside `{{…}}` as it was (iPXE's own
//! `${…}` settings included); the boot timeline's reading of a served script
//! never panics.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use pxe_user::{
    observe::timeline::script_files,
    policy::render::{self, MACHINE_VARIABLE, VARIABLES},
};

fuzz_target!(|data: &[u8]| {
    let Ok(template) = std::str::from_utf8(data) else { return };
    let asked = RefCell::new(Vec::new());
    let rendered = render::render(template, |name| {
        asked.borrow_mut().push(name.to_owned());
        Some(String::new())
    });
    if render::check(template).is_ok() {
        for name in asked.borrow().iter() {
            assert!(
                VARIABLES.contains(&name.as_str())
                    || name.strip_prefix(MACHINE_VARIABLE).is_some_and(|v| !v.is_empty()),
                "the check passed {template:?}, which asks for {name:?}"
            );
        }
        let outside: usize = template.len() - placeholder_bytes(template);
        assert_eq!(rendered.len(), outside, "{template:?} → {rendered:?}");
    }
    let _ = script_files(&rendered, "http://198.18.0.1");
});

/// Bytes of the `{{…}}` spans, delimiters included.
fn placeholder_bytes(template: &str) -> usize {
    let mut n = 0;
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        n += end + 4;
        rest = &after[end + 2..];
    }
    n
}
