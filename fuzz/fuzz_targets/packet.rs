//! The packet reader and rewriter (`oasis-io`) on arbitrary bytes: nothing
//! panics, and a rewrite of a packet etherparse finds whole and valid
//! leaves its checksums valid.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use oasis_io::packet::{
    End, addresses, clamp_mss, echo_id, fragment, icmp_error_quote, layout, ports, reset_reply, rewrite,
    must_not_fragment, rewrite_ip_address, tcp_closing, too_big_reply, unreachable_reply,
};

#[path = "checksums.rs"]
mod checksums;
use checksums::checksums_valid;

fuzz_target!(|data: &[u8]| {
    let _ = (layout(data), ports(data), addresses(data), fragment(data), echo_id(data));
    let _ = (icmp_error_quote(data), tcp_closing(data));
    let mut out = Vec::new();
    let _ = reset_reply(data, &mut out);
    let _ = unreachable_reply(data, &mut out);
    let _ = must_not_fragment(data);
    if too_big_reply(data, 1280, &mut out) {
        // What goes back to an application must be a valid ICMP error.
        assert!(out.len() <= 1280 + 28, "a too-big reply of {} bytes", out.len());
        assert_ne!(checksums_valid(&out), Some(false), "{out:?}");
    }

    let valid = checksums_valid(data) == Some(true);
    let v6 = data.first().is_some_and(|b| b >> 4 == 6);
    let addr: IpAddr = if v6 { "2001:db8::77".parse().unwrap() } else { "203.0.113.77".parse().unwrap() };
    for end in [End::Source, End::Destination] {
        let mut packet = data.to_vec();
        if rewrite(&mut packet, end, addr, 4242).is_ok() && valid {
            assert_eq!(checksums_valid(&packet), Some(true), "rewrite broke a checksum");
        }
        let mut packet = data.to_vec();
        let _ = rewrite_ip_address(&mut packet, end, addr);
    }
    let mut packet = data.to_vec();
    clamp_mss(&mut packet, 1200);
    if valid {
        assert_eq!(checksums_valid(&packet), Some(true), "clamping broke a checksum");
    }
});
