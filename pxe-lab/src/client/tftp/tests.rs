use std::time::Duration;

use super::*;

fn data(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 3];
    p.extend_from_slice(&block.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ack(block: u16) -> Step {
    Step::Send(packet::ack(block))
}

fn ask(blksize: u16, windowsize: u16) -> TftpProfile {
    TftpProfile {
        blksize,
        windowsize,
        tsize: true,
        timeout: Duration::from_secs(4),
        retries: super::MAX_RETRANSMITS,
    }
}

const OACK_512_2: &[u8] = b"\0\x06blksize\x00512\0windowsize\x002\0";

#[test]
fn the_request_asks_for_the_size_then_what_differs_from_the_defaults() {
    let (_, rrq) = Download::start("f", &ask(1468, 4), None);
    assert_eq!(
        rrq,
        b"\0\x01f\0octet\0tsize\x000\0blksize\x001468\0windowsize\x004\0"
    );
    let (_, rrq) = Download::start("f", &ask(0, 1), None);
    assert_eq!(rrq, b"\0\x01f\0octet\0tsize\x000\0");
}

#[test]
fn a_windowed_download_acks_each_window_and_the_last_block() {
    let file: Vec<u8> = (0..2600u32).map(|i| i as u8).collect();
    let (d, _) = Download::start("f", &ask(512, 2), Some(&file));
    let mut d = d.keeping_data();
    assert_eq!(d.on_datagram(OACK_512_2), ack(0));
    assert_eq!(d.on_datagram(&data(1, &file[..512])), Step::Wait);
    assert_eq!(d.on_datagram(&data(2, &file[512..1024])), ack(2));
    // Block 4 before 3: a gap, acknowledged at the last block in order.
    assert_eq!(d.on_datagram(&data(4, &file[1536..2048])), ack(2));
    assert_eq!(d.on_datagram(&data(3, &file[1024..1536])), Step::Wait);
    assert_eq!(
        d.on_timeout(),
        ack(3),
        "a timeout acknowledges the last block in order"
    );
    assert_eq!(d.on_datagram(&data(4, &file[1536..2048])), Step::Wait);
    assert_eq!(d.on_datagram(&data(5, &file[2048..2560])), ack(5));
    assert_eq!(
        d.on_datagram(&data(6, &file[2560..])),
        Step::Done {
            retransmits: 1,
            bytes: 2600
        }
    );
    assert_eq!(d.final_ack(), packet::ack(6));
    assert_eq!(
        *d.seen(),
        Seen {
            oack: vec![
                ("blksize".into(), "512".into()),
                ("windowsize".into(), "2".into())
            ],
            data_packets: 7,
            out_of_order: 1,
        }
    );
    assert_eq!(d.into_data(), file);
}

#[test]
fn a_corrupted_block_fails_the_download_and_tells_the_server() {
    let file = vec![7u8; 1000];
    let (mut d, _) = Download::start("f", &ask(0, 1), Some(&file));
    let mut bad = file[..512].to_vec();
    bad[100] ^= 1;
    match d.on_datagram(&data(1, &bad)) {
        Step::Fail {
            why,
            error: Some(error),
        } => {
            assert!(why.contains("differ"), "{why}");
            assert!(matches!(
                packet::Reply::parse(&error),
                Some(packet::Reply::Error { code: 0, .. })
            ));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_an_oack_data_1_or_error_can_open_the_transfer() {
    assert!(Download::is_first_reply(OACK_512_2));
    assert!(Download::is_first_reply(&data(1, b"x")));
    assert!(Download::is_first_reply(b"\0\x05\0\x01no\0"));
    assert!(!Download::is_first_reply(&data(
        2857,
        b"the end of an earlier transfer"
    )));
    assert!(!Download::is_first_reply(b"\x00"));
}

#[test]
fn silence_ends_in_failure_after_the_retries() {
    let (mut d, rrq) = Download::start("f", &ask(1468, 4), None);
    for _ in 0..MAX_RETRANSMITS {
        assert_eq!(d.on_timeout(), Step::Send(rrq.clone()), "the request again");
    }
    assert!(matches!(d.on_timeout(), Step::Fail { .. }));
}

#[test]
fn firmware_gives_up_after_its_retries_in_a_row_but_progress_resets_them() {
    let firmware = TftpProfile {
        retries: 2,
        ..ask(512, 1)
    };
    let (mut d, rrq) = Download::start("f", &firmware, None);
    assert_eq!(d.on_timeout(), Step::Send(rrq.clone()));
    assert_eq!(d.on_timeout(), Step::Send(rrq));
    assert_eq!(
        d.on_datagram(&data(1, &[7; 512])),
        ack(1),
        "a block: the count starts again"
    );
    assert_eq!(d.on_timeout(), ack(1));
    assert_eq!(d.on_timeout(), ack(1));
    let Step::Fail { why, .. } = d.on_timeout() else {
        panic!("a third timeout in a row ends it");
    };
    assert!(why.contains("2 retries in a row"), "{why}");
}
