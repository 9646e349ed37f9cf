//! iPXE script templates: `{{name}}` placeholders filled per machine.
//!
//! Double braces, because iPXE scripts use `${name}` for iPXE's own settings
//! and those must reach iPXE untouched.

/// Placeholders a template may use.
pub const VARIABLES: &[&str] = &[
    "mac",
    "arch",
    "uuid",
    "profile",
    "hostname",
    "server",
    "http",
    "kernel",
    "initrd",
    "cmdline",
    "provision_token",
    "provision_url",
];

/// The prefix of a machine's own variables: `{{var.role}}`.
pub const MACHINE_VARIABLE: &str = "var.";

/// Checks a template: every `{{…}}` must be closed and name a known variable.
pub fn check(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "a \"{{\" is never closed by \"}}\"".to_owned())?;
        let name = after[..end].trim();
        let machine_variable = name
            .strip_prefix(MACHINE_VARIABLE)
            .is_some_and(|v| !v.is_empty());
        if !VARIABLES.contains(&name) && !machine_variable {
            return Err(format!(
                "unknown placeholder {{{{{name}}}}}; known: {}, var.NAME",
                VARIABLES.join(", ")
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

/// Fills a checked template; `value` answers each placeholder (empty if `None`).
pub fn render(template: &str, value: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        out.push_str(&value(after[..end].trim()).unwrap_or_default());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_ipxe_settings_left_alone() {
        let t = "#!ipxe\nkernel {{http}}/vmlinuz BOOTIF=${net0/mac} mac={{ mac }}\n";
        check(t).unwrap();
        let got = render(t, |name| match name {
            "http" => Some("http://198.18.0.1".into()),
            "mac" => Some("52:54:00:00:00:01".into()),
            _ => None,
        });
        assert_eq!(
            got,
            "#!ipxe\nkernel http://198.18.0.1/vmlinuz BOOTIF=${net0/mac} mac=52:54:00:00:00:01\n"
        );
    }

    #[test]
    fn unknown_or_unclosed_placeholders_are_rejected() {
        assert!(check("{{nope}}")
            .unwrap_err()
            .contains("unknown placeholder {{nope}}"));
        assert!(check("kernel {{http").is_err());
    }
}
