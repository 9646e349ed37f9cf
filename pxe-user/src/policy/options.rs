//! DHCP options an operator sets in the config: by name for the common
//! ones, by code with a type for any other, each encoded once when the
//! config is read (RFC 2132 and the RFCs named below).
//!
//! Precedence, most specific first: machine, class, profile, subnet. An option
//! set at a level replaces the same code from the levels under it, and
//! replaces what pxed would send itself (router, DNS, domain, 66, 67...).
//! The codes pxed must own (message type, server identifier, lease times,
//! the subnet mask...) cannot be set.
//!
//! A configured option goes to a client that lists it in its parameter
//! request list (option 55), or to every client when it is marked
//! `always_send` (RFC 2131 §4.3.1 lets a server send options not asked
//! for; some clients want them and do not ask). A proxyDHCP answer carries
//! only the boot options among them ([`is_boot_server_option`]).

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;

/// Options by code, each value already in its wire form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionSet(BTreeMap<u8, Configured>);

/// One option as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configured {
    /// The value in wire form.
    pub value: Vec<u8>,
    /// Sent whether or not the client asked for it (option 55).
    pub always_send: bool,
}

impl OptionSet {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `code`; `false` if it was already set.
    pub fn insert(&mut self, code: u8, option: Configured) -> bool {
        self.0.insert(code, option).is_none()
    }

    /// These options over `below`'s: a code set in both is taken from here.
    pub fn over(&self, below: &OptionSet) -> OptionSet {
        let mut merged = below.clone();
        merged
            .0
            .extend(self.0.iter().map(|(code, value)| (*code, value.clone())));
        merged
    }

    /// The options whose code `keep` accepts.
    pub fn only(&self, keep: impl Fn(u8) -> bool) -> OptionSet {
        OptionSet(
            self.0
                .iter()
                .filter(|(code, _)| keep(**code))
                .map(|(code, o)| (*code, o.clone()))
                .collect(),
        )
    }

    pub fn get(&self, code: u8) -> Option<&Configured> {
        self.0.get(&code)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u8, &Configured)> {
        self.0.iter().map(|(code, option)| (*code, option))
    }

    /// The options a client gets that asked for `requested` (its option
    /// 55, `None` when it sent none).
    pub fn for_request<'a>(
        &'a self,
        requested: Option<&'a [u8]>,
    ) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let asked = move |code: u8| requested.is_some_and(|list| list.contains(&code));
        self.0
            .iter()
            .filter(move |(code, o)| o.always_send || asked(**code))
            .map(|(code, o)| (*code, o.value.as_slice()))
    }
}

/// How a value is written in the config and encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// One IPv4 address.
    Ip,
    /// One or more IPv4 addresses.
    Ips,
    U8,
    U16,
    U32,
    /// A signed 32-bit integer (option 2, time offset).
    I32,
    Bool,
    /// Text, sent as its bytes.
    Text,
    /// Bytes as hex, `"01:02:ab"` or `"0102ab"`.
    Hex,
    /// Domain names in RFC 1035 form, uncompressed (option 119, RFC 3397).
    Domains,
    /// Classless static routes, `"10.0.0.0/8 via 198.18.0.1"` (RFC 3442).
    Routes,
}

const KINDS: &[(&str, Kind)] = &[
    ("ip", Kind::Ip),
    ("ips", Kind::Ips),
    ("u8", Kind::U8),
    ("u16", Kind::U16),
    ("u32", Kind::U32),
    ("i32", Kind::I32),
    ("bool", Kind::Bool),
    ("string", Kind::Text),
    ("hex", Kind::Hex),
    ("domains", Kind::Domains),
    ("routes", Kind::Routes),
];

/// The options known by name.
const NAMED: &[(&str, u8, Kind)] = &[
    ("time-offset", 2, Kind::I32),
    ("routers", 3, Kind::Ips),
    ("dns-servers", 6, Kind::Ips),
    ("log-servers", 7, Kind::Ips),
    ("host-name", 12, Kind::Text),
    ("domain-name", 15, Kind::Text),
    ("root-path", 17, Kind::Text),
    ("ip-forwarding", 19, Kind::Bool),
    ("default-ttl", 23, Kind::U8),
    ("interface-mtu", 26, Kind::U16),
    ("broadcast-address", 28, Kind::Ip),
    ("ntp-servers", 42, Kind::Ips),
    ("vendor-encapsulated-options", 43, Kind::Hex),
    ("netbios-name-servers", 44, Kind::Ips),
    ("tftp-server-name", 66, Kind::Text),
    ("bootfile-name", 67, Kind::Text),
    ("domain-search", 119, Kind::Domains),
    ("classless-static-routes", 121, Kind::Routes),
    ("tftp-server-address", 150, Kind::Ips),
    ("wpad", 252, Kind::Text),
];

/// Whether a proxyDHCP answer (beside the site's DHCP server, and on port
/// 4011) carries configured option `code`: what a PXE client takes from a
/// boot server (PXE 2.1 §2.2), not what its lease carries, which is the
/// site server's to give. 43 (PXE's and vendors' sub-options), 66 and 67,
/// 128-135 (PXE's vendor-specific), 175 (iPXE's), 209-211 (PXELINUX's
/// config file, path prefix and reboot time, RFC 5071).
pub fn is_boot_server_option(code: u8) -> bool {
    matches!(code, 43 | 66 | 67 | 128..=135 | 175 | 209..=211)
}

/// The name `code` is known by in the config, if it has one.
pub fn name_of(code: u8) -> Option<&'static str> {
    NAMED
        .iter()
        .find(|(_, c, _)| *c == code)
        .map(|(name, ..)| *name)
}

/// `value` of option `code` as a person reads it: decoded by its type when
/// pxed knows the code by name, else as hex bytes.
pub fn show(code: u8, value: &[u8]) -> String {
    let kind = NAMED.iter().find(|(_, c, _)| *c == code).map(|(.., k)| *k);
    kind.and_then(|kind| decode(kind, value))
        .unwrap_or_else(|| hex_text(value))
}

fn hex_text(value: &[u8]) -> String {
    let bytes: Vec<String> = value.iter().map(|b| format!("{b:02x}")).collect();
    bytes.join(":")
}

/// The config's form of a wire value, `None` when it is not one of `kind`.
fn decode(kind: Kind, value: &[u8]) -> Option<String> {
    let ips = |bytes: &[u8]| -> Option<Vec<String>> {
        (bytes.len().is_multiple_of(4) && !bytes.is_empty()).then(|| {
            bytes
                .chunks(4)
                .map(|q| Ipv4Addr::new(q[0], q[1], q[2], q[3]).to_string())
                .collect()
        })
    };
    Some(match (kind, value) {
        (Kind::Ip | Kind::Ips, _) => ips(value)?.join(", "),
        (Kind::U8, [n]) => n.to_string(),
        (Kind::Bool, [n]) => (*n != 0).to_string(),
        (Kind::U16, [a, b]) => u16::from_be_bytes([*a, *b]).to_string(),
        (Kind::U32, [a, b, c, d]) => u32::from_be_bytes([*a, *b, *c, *d]).to_string(),
        (Kind::I32, [a, b, c, d]) => i32::from_be_bytes([*a, *b, *c, *d]).to_string(),
        (Kind::Text, _) => format!("{:?}", String::from_utf8_lossy(value)),
        (Kind::Domains, _) => {
            let mut names = Vec::new();
            let mut rest = value;
            while !rest.is_empty() {
                let mut labels = Vec::new();
                loop {
                    let (&len, tail) = rest.split_first()?;
                    rest = tail;
                    if len == 0 {
                        break;
                    }
                    let label = rest.get(..usize::from(len))?;
                    labels.push(String::from_utf8_lossy(label).into_owned());
                    rest = &rest[usize::from(len)..];
                }
                names.push(labels.join("."));
            }
            names.join(", ")
        }
        (Kind::Routes, _) => {
            let mut routes = Vec::new();
            let mut rest = value;
            while let Some((&width, tail)) = rest.split_first() {
                let octets = usize::from(width).div_ceil(8);
                let (net, tail) = (tail.get(..octets)?, tail.get(octets..)?);
                let (via, tail) = (tail.get(..4)?, &tail[4..]);
                let mut dest = [0u8; 4];
                dest.get_mut(..octets)?.copy_from_slice(net);
                routes.push(format!(
                    "{}/{width} via {}",
                    Ipv4Addr::from(dest),
                    Ipv4Addr::new(via[0], via[1], via[2], via[3])
                ));
                rest = tail;
            }
            routes.join(", ")
        }
        _ => return None,
    })
}

/// Codes pxed writes from what it decides, and why none may be set.
const OWN: &[(u8, &str)] = &[
    (0, "padding"),
    (1, "the subnet mask, from the subnet's network"),
    (50, "the requested address, a client's option"),
    (51, "the lease time, from the subnet's lease_time"),
    (52, "option overload, pxed's encoding"),
    (53, "the message type"),
    (54, "the server identifier"),
    (55, "the parameter request list, a client's option"),
    (57, "the maximum message size, a client's option"),
    (58, "the renewal time, from the lease time"),
    (59, "the rebinding time, from the lease time"),
    (61, "the client identifier, a client's option"),
    (82, "relay agent information, echoed from the relay"),
    (255, "the end marker"),
];

/// One option as written under `options`: `key` is a name from the table
/// above, its value as its type wants it (or `{ value = ..., always_send =
/// true }`), or a code, `"224"`, whose value says its type: `{ type =
/// "hex", value = "01:02" }` (and `always_send` if wanted). Returns the
/// code and the option, or what is wrong, for the config's error.
pub fn parse(key: &str, value: &toml::Value) -> Result<(u8, Configured), String> {
    let (code, kind, value, always_send) = match NAMED.iter().find(|(name, ..)| *name == key) {
        Some((_, code, kind)) => {
            let (value, always_send) = match value.as_table() {
                Some(table) => {
                    if table.contains_key("type") {
                        return Err(format!(
                            "{key} is option {code}, whose type pxed knows: leave out type"
                        ));
                    }
                    with_always_send(table, "{ value = ..., always_send = true }")?
                }
                None => (value, false),
            };
            (*code, *kind, value, always_send)
        }
        None => {
            let code = code_of(key)?;
            let (kind, value, always_send) = typed(value)?;
            (code, kind, value, always_send)
        }
    };
    if let Some((_, why)) = OWN.iter().find(|(own, _)| *own == code) {
        return Err(format!("option {code} cannot be set: pxed sends {why}"));
    }
    let bytes = encode(kind, value)?;
    if bytes.is_empty() || bytes.len() > 255 {
        return Err(format!(
            "option {code}'s value is {} bytes; an option holds 1 to 255",
            bytes.len()
        ));
    }
    Ok((
        code,
        Configured {
            value: bytes,
            always_send,
        },
    ))
}

/// A table's `value` and `always_send`; `form` says how it is written.
fn with_always_send<'a>(
    table: &'a toml::Table,
    form: &str,
) -> Result<(&'a toml::Value, bool), String> {
    if let Some(other) = table
        .keys()
        .find(|k| !["type", "value", "always_send"].contains(&k.as_str()))
    {
        return Err(format!("unknown key {other:?}; write {form}"));
    }
    let value = table
        .get("value")
        .ok_or_else(|| format!("no value; write {form}"))?;
    let always_send = match table.get("always_send") {
        None => false,
        Some(flag) => flag
            .as_bool()
            .ok_or_else(|| format!("always_send is true or false, not {flag}"))?,
    };
    Ok((value, always_send))
}

fn code_of(key: &str) -> Result<u8, String> {
    let number: u32 = key.parse().map_err(|_| {
        let names: Vec<&str> = NAMED.iter().map(|(name, ..)| *name).collect();
        format!(
            "{key:?} is neither an option name ({}) nor a code (1 to 254)",
            names.join(", ")
        )
    })?;
    u8::try_from(number)
        .ok()
        .filter(|c| (1..=254).contains(c))
        .ok_or_else(|| format!("option code {number} is outside 1 to 254"))
}

/// `{ type = "...", value = ..., always_send = ... }`: the kind, the
/// value and whether it is always sent.
fn typed(value: &toml::Value) -> Result<(Kind, &toml::Value, bool), String> {
    let types: Vec<&str> = KINDS.iter().map(|(name, _)| *name).collect();
    let form = format!("{{ type = \"{}\", value = ... }}", types.join("\" | \""));
    let expected = || format!("an option given by code needs {form}");
    let table = value.as_table().ok_or_else(expected)?;
    let (value, always_send) = with_always_send(table, &form)?;
    let name = table
        .get("type")
        .and_then(toml::Value::as_str)
        .ok_or_else(expected)?;
    let kind = KINDS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, kind)| *kind)
        .ok_or_else(|| format!("type {name:?} is not one of {}", types.join(", ")))?;
    Ok((kind, value, always_send))
}

fn encode(kind: Kind, value: &toml::Value) -> Result<Vec<u8>, String> {
    Ok(match kind {
        Kind::Ip => ip(value)?.octets().to_vec(),
        Kind::Ips => {
            let mut bytes = Vec::new();
            for one in list(value)? {
                bytes.extend_from_slice(&ip(one)?.octets());
            }
            bytes
        }
        Kind::U8 => vec![integer(value, 0, u8::MAX.into())? as u8],
        Kind::U16 => (integer(value, 0, u16::MAX.into())? as u16)
            .to_be_bytes()
            .to_vec(),
        Kind::U32 => (integer(value, 0, u32::MAX.into())? as u32)
            .to_be_bytes()
            .to_vec(),
        Kind::I32 => (integer(value, i32::MIN.into(), i32::MAX.into())? as i32)
            .to_be_bytes()
            .to_vec(),
        Kind::Bool => vec![u8::from(
            value
                .as_bool()
                .ok_or_else(|| format!("{value} is not true or false"))?,
        )],
        Kind::Text => text(value)?.as_bytes().to_vec(),
        Kind::Hex => hex(text(value)?)?,
        Kind::Domains => {
            let mut bytes = Vec::new();
            for one in list(value)? {
                domain(text(one)?, &mut bytes)?;
            }
            bytes
        }
        Kind::Routes => {
            let mut bytes = Vec::new();
            for one in list(value)? {
                route(text(one)?, &mut bytes)?;
            }
            bytes
        }
    })
}

/// A list, or one value standing for a list of one.
fn list(value: &toml::Value) -> Result<Vec<&toml::Value>, String> {
    Ok(match value.as_array() {
        Some(items) if items.is_empty() => return Err("the list is empty".into()),
        Some(items) => items.iter().collect(),
        None => vec![value],
    })
}

fn text(value: &toml::Value) -> Result<&str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("{value} is not a string"))
}

fn ip(value: &toml::Value) -> Result<Ipv4Addr, String> {
    let s = text(value)?;
    s.parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}

fn integer(value: &toml::Value, min: i64, max: i64) -> Result<i64, String> {
    value
        .as_integer()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("{value} is not an integer from {min} to {max}"))
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: String = s.chars().filter(|c| *c != ':' && *c != ' ').collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("{s:?}: hex needs two digits per byte"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .map_err(|_| format!("{s:?} is not hex (\"01:02:ab\" or \"0102ab\")"))
        })
        .collect()
}

/// `name` in RFC 1035 §3.1 form: labels of 1 to 63 bytes, then a zero.
fn domain(name: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(format!("{name:?} is not a domain name"));
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{name:?}: each label of a domain name is 1 to 63 bytes"
            ));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

/// `"NET/LEN via ROUTER"` in RFC 3442 form: the prefix length, the
/// network's significant octets, the router.
fn route(text: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let wrong = || format!("{text:?} is not \"a.b.c.d/len via a.b.c.d\"");
    let (net, router) = text.split_once(" via ").ok_or_else(wrong)?;
    let net: Ipv4Net = net.trim().parse().map_err(|_| wrong())?;
    let router: Ipv4Addr = router.trim().parse().map_err(|_| wrong())?;
    let significant = usize::from(net.prefix_len().div_ceil(8));
    out.push(net.prefix_len());
    out.extend_from_slice(&net.trunc().network().octets()[..significant]);
    out.extend_from_slice(&router.octets());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(toml_value: &str) -> toml::Value {
        toml::from_str::<toml::Table>(&format!("v = {toml_value}")).unwrap()["v"].clone()
    }

    fn ok(key: &str, toml_value: &str) -> (u8, Vec<u8>) {
        let (code, option) = parse(key, &value(toml_value)).unwrap();
        (code, option.value)
    }

    #[test]
    fn values_are_shown_as_the_config_writes_them() {
        for (key, written, shown) in [
            ("time-offset", "-3600", "-3600"),
            (
                "routers",
                r#"["198.18.0.1", "198.18.0.2"]"#,
                "198.18.0.1, 198.18.0.2",
            ),
            ("host-name", r#""node-7""#, r#""node-7""#),
            ("ip-forwarding", "true", "true"),
            ("interface-mtu", "9000", "9000"),
            ("default-ttl", "64", "64"),
            (
                "domain-search",
                r#"["r12.example.net", "example.net"]"#,
                "r12.example.net, example.net",
            ),
            (
                "classless-static-routes",
                r#"["10.20.0.0/16 via 198.18.0.254", "0.0.0.0/0 via 198.18.0.1"]"#,
                "10.20.0.0/16 via 198.18.0.254, 0.0.0.0/0 via 198.18.0.1",
            ),
            ("vendor-encapsulated-options", r#""01:02:ab""#, "01:02:ab"),
            ("224", r#"{ type = "u8", value = 7 }"#, "07"),
        ] {
            let (code, wire) = ok(key, written);
            assert_eq!(show(code, &wire), shown, "{key}");
        }
        assert_eq!(
            show(3, &[198, 18, 0]),
            "c6:12:00",
            "not whole addresses: hex"
        );
    }

    fn err(key: &str, toml_value: &str) -> String {
        parse(key, &value(toml_value)).unwrap_err()
    }

    #[test]
    fn named_options_take_their_values_as_written() {
        assert_eq!(
            ok("ntp-servers", r#"["198.18.0.5", "198.18.0.6"]"#),
            (42, vec![198, 18, 0, 5, 198, 18, 0, 6])
        );
        assert_eq!(
            ok("ntp-servers", r#""198.18.0.5""#),
            (42, vec![198, 18, 0, 5])
        );
        assert_eq!(ok("interface-mtu", "9000"), (26, vec![0x23, 0x28]));
        assert_eq!(
            ok("time-offset", "-3600"),
            (2, (-3600i32).to_be_bytes().to_vec())
        );
        assert_eq!(ok("ip-forwarding", "false"), (19, vec![0]));
        assert_eq!(
            ok("wpad", r#""http://wpad/wpad.dat""#).1,
            b"http://wpad/wpad.dat"
        );
    }

    #[test]
    fn domain_search_and_static_routes_are_in_their_rfcs_form() {
        // RFC 3397 §2's own example, uncompressed.
        assert_eq!(
            ok(
                "domain-search",
                r#"["eng.apple.com", "marketing.apple.com"]"#
            )
            .1,
            b"\x03eng\x05apple\x03com\x00\x09marketing\x05apple\x03com\x00"
        );
        // RFC 3442 §3: width, significant octets, router.
        assert_eq!(
            ok(
                "classless-static-routes",
                r#"["10.17.0.0/16 via 198.18.0.254", "0.0.0.0/0 via 198.18.0.1"]"#
            )
            .1,
            vec![16, 10, 17, 198, 18, 0, 254, 0, 198, 18, 0, 1]
        );
    }

    #[test]
    fn options_by_code_say_their_type() {
        assert_eq!(
            ok("224", r#"{ type = "hex", value = "01:02:ab" }"#),
            (224, vec![1, 2, 0xab])
        );
        assert_eq!(
            ok("225", r#"{ type = "u32", value = 7 }"#),
            (225, vec![0, 0, 0, 7])
        );
        assert_eq!(
            ok("226", r#"{ type = "string", value = "rack-7" }"#).1,
            b"rack-7"
        );
        assert_eq!(
            ok("227", r#"{ type = "ip", value = "10.0.0.1" }"#),
            (227, vec![10, 0, 0, 1])
        );
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        assert!(err("300", r#"{ type = "u8", value = 1 }"#).contains("outside 1 to 254"));
        assert!(err("ntp-server", r#""10.0.0.1""#).contains("neither an option name"));
        assert!(err("224", r#""01""#).contains("needs { type ="));
        assert!(err("224", r#"{ type = "float", value = 1 }"#).contains("not one of"));
        assert!(err("224", r#"{ type = "u8", value = 256 }"#).contains("from 0 to 255"));
        assert!(err("224", r#"{ type = "hex", value = "0g" }"#).contains("not hex"));
        assert!(err("224", r#"{ type = "u8", vlaue = 1 }"#).contains("unknown key \"vlaue\""));
        assert!(err("ntp-servers", r#"["10.0.0.300"]"#).contains("not an IPv4 address"));
        assert!(err("ntp-servers", "[]").contains("empty"));
        assert!(
            err("ntp-servers", r#"{ type = "ips", value = "10.0.0.1" }"#)
                .contains("whose type pxed knows")
        );
        assert!(err("53", r#"{ type = "u8", value = 1 }"#).contains("message type"));
        assert!(err("1", r#"{ type = "ip", value = "255.0.0.0" }"#).contains("subnet mask"));
        let long = format!(r#"{{ type = "string", value = "{}" }}"#, "x".repeat(256));
        assert!(err("224", &long).contains("1 to 255"));
    }

    fn option(value: &[u8], always_send: bool) -> Configured {
        Configured {
            value: value.to_vec(),
            always_send,
        }
    }

    #[test]
    fn the_more_specific_set_wins_code_by_code() {
        let mut subnet = OptionSet::default();
        subnet.insert(42, option(&[1, 1, 1, 1], false));
        subnet.insert(26, option(&[5, 220], false));
        let mut machine = OptionSet::default();
        machine.insert(42, option(&[2, 2, 2, 2], false));
        let merged = machine.over(&subnet);
        let sent = merged.for_request(Some(&[42, 26]));
        let sent: Vec<(u8, Vec<u8>)> = sent.map(|(c, v)| (c, v.to_vec())).collect();
        assert_eq!(sent, vec![(26, vec![5, 220]), (42, vec![2, 2, 2, 2])]);
    }

    #[test]
    fn a_client_gets_what_it_asked_for_and_what_is_always_sent() {
        let (code, always) = parse(
            "wpad",
            &value(r#"{ value = "http://wpad/wpad.dat", always_send = true }"#),
        )
        .unwrap();
        assert!(always.always_send);
        let mut set = OptionSet::default();
        set.insert(code, always);
        set.insert(42, option(&[10, 0, 0, 5], false));
        let codes = |requested: Option<&[u8]>| {
            set.for_request(requested)
                .map(|(c, _)| c)
                .collect::<Vec<_>>()
        };
        assert_eq!(codes(Some(&[1, 3, 42])), vec![42, 252]);
        assert_eq!(codes(Some(&[1, 3])), vec![252]);
        assert_eq!(codes(None), vec![252]);
        assert!(parse(
            "224",
            &value(r#"{ type = "u8", value = 1, always_send = "yes" }"#)
        )
        .unwrap_err()
        .contains("true or false"));
    }
}
