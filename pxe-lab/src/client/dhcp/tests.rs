use super::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PROXY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

fn edk2(mac: [u8; 6]) -> Identity {
    Identity {
        vendor_class: Some(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
        arch: Some(7),
        network_interface: Some((1, 2, 1)),
        uuid: Some([9; 16]),
        parameter_request_list: pxe_parameter_request_list(),
        ..Identity::plain(mac)
    }
}

fn schedule() -> Schedule {
    Schedule {
        retries: vec![Duration::from_secs(4), Duration::from_secs(8)],
        offer_wait: Duration::from_millis(500),
        max_naks: 2,
    }
}

/// A reply of `kind` from `server` to transaction `xid`, offering `yiaddr`.
fn reply(kind: MessageType, xid: u32, server: Ipv4Addr, yiaddr: Ipv4Addr) -> Message {
    let mut m = request(
        &Identity::plain([0x52, 0x54, 0, 1, 2, 3]),
        kind,
        xid,
        vec![],
    );
    m.set_opcode(v4::Opcode::BootReply);
    m.set_yiaddr(yiaddr);
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    m
}

fn sent(step: Step) -> Message {
    match step {
        Step::Broadcast(bytes) => Message::decode(&mut Decoder::new(&bytes)).unwrap(),
        other => panic!("expected a broadcast, got {other:?}"),
    }
}

#[test]
fn replies_are_known_by_the_xid_of_a_whole_bootp_reply() {
    let m = request(
        &edk2([0x52, 0x54, 0, 1, 2, 3]),
        MessageType::Offer,
        0x1234_5678,
        vec![],
    );
    assert_eq!(reply_xid(&encode(&m)), None, "a request is no reply");
    let mut m = m;
    m.set_opcode(v4::Opcode::BootReply);
    let bytes = encode(&m);
    assert_eq!(reply_xid(&bytes), Some(0x1234_5678));
    assert_eq!(
        reply_xid(&bytes[..235]),
        None,
        "cut inside the fixed header"
    );
}

#[test]
fn requests_carry_the_options_pxe_firmware_sends() {
    let identity = edk2([0x52, 0x54, 0, 1, 2, 3]).as_ipxe();
    let back = Message::decode(&mut Decoder::new(&encode(&request(
        &identity,
        MessageType::Discover,
        42,
        vec![],
    ))))
    .unwrap();
    let opts = back.opts();
    assert_eq!(back.xid(), 42);
    assert!(back.flags().broadcast());
    assert_eq!(opts.msg_type(), Some(MessageType::Discover));
    assert_eq!(
        opts.get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(
            identity.vendor_class.clone().unwrap()
        ))
    );
    assert_eq!(
        opts.get(OptionCode::ClientSystemArchitecture),
        Some(&DhcpOption::ClientSystemArchitecture(
            v4::Architecture::from(7)
        ))
    );
    assert_eq!(
        opts.get(OptionCode::UserClass),
        Some(&DhcpOption::UserClass(b"\x04iPXE".to_vec()))
    );
    let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
        opts.get(OptionCode::ClientMachineIdentifier)
    else {
        panic!("option 97")
    };
    assert_eq!(uuid.len(), 17, "type 0 and a 16-byte GUID");
    assert!(opts.get(OptionCode::ParameterRequestList).is_some());
    assert!(opts.get(OptionCode::ClientNetworkInterface).is_some());
}

#[test]
fn a_plain_client_sends_no_pxe_option() {
    let m = request(&Identity::plain([2; 6]), MessageType::Discover, 1, vec![]);
    let codes: Vec<OptionCode> = m.opts().iter().map(|(code, _)| *code).collect();
    assert_eq!(codes, [OptionCode::MessageType]);
}

#[test]
fn the_boot_file_field_loses_its_nul_padding() {
    let mut m = Message::default();
    m.set_fname(b"ipxe.efi\0\0\0");
    assert_eq!(boot_file(&m).as_deref(), Some("ipxe.efi"));
    m.set_fname(b"");
    assert_eq!(boot_file(&m), None);
}

#[test]
fn an_address_offer_and_a_proxy_offer_make_one_lease() {
    let t0 = Instant::now();
    let mut dora = Dora::new(edk2([0x52, 0x54, 0, 1, 2, 3]), 7, schedule());
    assert_eq!(kind(&sent(dora.start(t0))), Some(MessageType::Discover));
    let address = Ipv4Addr::new(198, 18, 0, 50);
    let offer = reply(MessageType::Offer, 7, SERVER, address);
    assert_eq!(
        dora.on_reply(t0 + Duration::from_millis(3), &encode(&offer)),
        Step::Wait
    );
    assert_eq!(
        dora.deadline(),
        Some(t0 + Duration::from_millis(503)),
        "waits offer_wait for a proxy offer"
    );
    let mut proxy = reply(MessageType::Offer, 7, PROXY, Ipv4Addr::UNSPECIFIED);
    proxy.set_fname(b"ipxe.efi");
    proxy.set_siaddr(PROXY);
    let request = sent(dora.on_reply(t0 + Duration::from_millis(5), &encode(&proxy)));
    assert_eq!(kind(&request), Some(MessageType::Request));
    assert_eq!(server_id(&request), Some(SERVER));
    let stranger = reply(MessageType::Ack, 7, PROXY, address);
    assert_eq!(
        dora.on_reply(t0 + Duration::from_millis(6), &encode(&stranger)),
        Step::Wait,
        "only the offering server's answer counts"
    );
    let ack = reply(MessageType::Ack, 7, SERVER, address);
    assert_eq!(
        dora.on_reply(t0 + Duration::from_millis(9), &encode(&ack)),
        Step::Done(Lease {
            address,
            server: SERVER,
            next_server: PROXY,
            boot_file: Some("ipxe.efi".into()),
        })
    );
    let tally = dora.tally();
    assert_eq!((tally.retransmits, tally.naks), (0, 0));
    assert_eq!(tally.offer_delay, Duration::from_millis(3));
    assert_eq!(tally.ack_delay, Duration::from_millis(4));
}

#[test]
fn a_nak_pauses_ignores_the_old_round_and_starts_over() {
    let t0 = Instant::now();
    let mut dora = Dora::new(Identity::plain([2; 6]), 9, schedule());
    dora.start(t0);
    let address = Ipv4Addr::new(198, 18, 0, 51);
    let offer = encode(&reply(MessageType::Offer, 9, SERVER, address));
    assert_eq!(dora.on_reply(t0, &offer), Step::Wait);
    assert_eq!(kind(&sent(dora.on_timeout(t0))), Some(MessageType::Request));
    let nak = encode(&reply(MessageType::Nak, 9, SERVER, Ipv4Addr::UNSPECIFIED));
    assert_eq!(dora.on_reply(t0, &nak), Step::Wait);
    let until = dora.deadline().unwrap();
    assert!(until < t0 + Duration::from_secs(1));
    assert_eq!(
        dora.on_reply(t0, &offer),
        Step::Wait,
        "a late offer of the old round"
    );
    assert_eq!(
        kind(&sent(dora.on_timeout(until))),
        Some(MessageType::Discover)
    );
    dora.on_reply(until, &offer);
    sent(dora.on_timeout(until));
    assert_eq!(
        dora.on_reply(until, &nak),
        Step::Failed("NAKed 2 times in a row".into())
    );
    assert_eq!(dora.tally().naks, 2);
    assert_eq!(dora.tally().retransmits, 0, "NAKs are answers, not silence");
}

#[test]
fn silence_ends_in_failure_after_the_schedule() {
    let t0 = Instant::now();
    let mut dora = Dora::new(Identity::plain([2; 6]), 1, schedule());
    dora.start(t0);
    assert_eq!(dora.deadline(), Some(t0 + Duration::from_secs(4)));
    let t1 = t0 + Duration::from_secs(4);
    assert_eq!(
        kind(&sent(dora.on_timeout(t1))),
        Some(MessageType::Discover)
    );
    assert_eq!(dora.deadline(), Some(t1 + Duration::from_secs(8)));
    assert_eq!(
        dora.on_timeout(t1 + Duration::from_secs(8)),
        Step::Failed("no OFFER after 2 DISCOVERs".into())
    );
    assert_eq!(dora.tally().retransmits, 1);
    assert_eq!(dora.deadline(), None);
}

#[test]
fn machines_nakd_together_restart_apart() {
    // xids as `bench pxe` makes them: from the last three bytes of each MAC.
    let pauses: Vec<u64> = (0u32..200)
        .map(|i| restart_pause(0x1000_0000 | i << 8, 1).as_millis() as u64)
        .collect();
    assert!(pauses.iter().all(|&p| p < 1000));
    let mut tenths = [0; 10];
    for p in &pauses {
        tenths[*p as usize / 100] += 1;
    }
    assert!(
        tenths.iter().all(|&n| n >= 8),
        "spread over the second: {tenths:?}"
    );
    assert_ne!(restart_pause(0x1000_0100, 1), restart_pause(0x1000_0100, 2));
}
