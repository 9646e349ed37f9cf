//! Any datagram on port 67 or 4011, through classification and the engine in
//! both modes, to an encoded reply: nothing may panic, and every reply must
//! decode again. `cargo +nightly fuzz run dhcp_decision` (see fuzz/README.md).
#![no_main]

use std::{collections::HashMap, net::{Ipv4Addr, SocketAddrV4}};

use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use libfuzzer_sys::fuzz_target;
use pxe_user::{
    dhcp::{classify::classify, engine::{Arrival, Engine, EngineConfig, Mode}, pool::{parse_range, Subnet}},
    lease::MemLeaseStore,
    policy::{r#static::{Profile, StaticPolicy}, SharedPolicy},
};

/// libFuzzer's panic hook aborts on any panic, even one the daemon contains:
/// `classify` catches dhcproto's debug assertions on hostile option lengths
/// and ignores the datagram, as pxed does. A quiet hook lets that path run;
/// a panic nothing catches still unwinds into libfuzzer-sys, which aborts.
static QUIET_CONTAINED_PANICS: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    QUIET_CONTAINED_PANICS.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&selector, datagram)) = data.split_first() else { return };
    let Ok(request) = classify(datagram) else { return };
    let server = Ipv4Addr::new(198, 18, 0, 1);
    let policy = SharedPolicy::new(StaticPolicy {
        profiles: [("default".to_owned(), Profile::named("default"))].into(),
        machines: HashMap::new(),
        default_profile: Some("default".into()),
        provision: None,
        classes: Vec::new(),
    });
    let config = EngineConfig {
        mode: if selector & 1 == 0 { Mode::Full } else { Mode::Proxy },
        subnets: vec![Subnet {
            network: "198.18.0.0/24".parse().unwrap(),
            ranges: vec![parse_range("198.18.0.100-198.18.0.110").unwrap()],
            exclude: vec![],
            router: None,
            dns: vec![],
            domain: None,
            lease_time: 3600,
            options: Default::default(),
        }],
        reservations: HashMap::new(),
        authoritative: selector & 2 != 0,
        http_port: 80,
        kernel_answers: selector & 8 != 0,
        shared_pools: selector & 16 != 0,
    };
    let mut engine = Engine::new(config, policy, Box::new(MemLeaseStore::default())).unwrap();
    let port = if selector & 4 == 0 { 67 } else { 4011 };
    let arrival = Arrival { port, source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68), server_ip: server };
    let outcome = engine.handle(&request, arrival, 1_000_000);
    if let Some(reply) = outcome.reply {
        let mut bytes = Vec::new();
        reply.message.encode(&mut Encoder::new(&mut bytes)).unwrap();
        dhcproto::v4::Message::decode(&mut Decoder::new(&bytes)).expect("our reply decodes");
    }
});
