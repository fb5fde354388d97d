//! Reading the packet behind the shim.

/// FNV-1a over the IP packet's flow (addresses, protocol, ports): the same
/// for every packet of a flow, so a flow keeps one entry node.
pub fn flow_hash(packet: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            eat(&packet[12..20]);
            eat(&packet[9..10]);
            if let Some(ports) = packet.get(ihl..ihl + 4) {
                eat(ports);
            }
        }
        Some(6) if packet.len() >= 40 => {
            eat(&packet[8..40]);
            eat(&packet[6..7]);
            if let Some(ports) = packet.get(40..44) {
                eat(ports);
            }
        }
        _ => eat(packet),
    }
    hash
}

/// FNV-1a over all the bytes.
pub fn bytes_hash(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A TCP handshake packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// A connection's first packet (SYN without ACK), from the client.
    Syn(u64),
    /// The server's answer (SYN and ACK), to the client.
    SynAck(u64),
}

/// Whether `packet` (a bare IP packet) opens a TCP connection or answers
/// an opening, with a key that is the same for both: a hash of the
/// client's and the server's address and port.
pub fn handshake(packet: &[u8]) -> Option<Handshake> {
    const TCP: u8 = 6;
    let (src, dst, tcp) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 && packet[9] == TCP => {
            // A later fragment has no TCP header at its start.
            if u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0 {
                return None;
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            (&packet[12..16], &packet[16..20], packet.get(ihl..)?)
        }
        Some(6) if packet.len() >= 40 && packet[6] == TCP => (&packet[8..24], &packet[24..40], &packet[40..]),
        _ => return None,
    };
    let flags = *tcp.get(13)?;
    let (sport, dport) = (tcp.get(0..2)?, tcp.get(2..4)?);
    let key = |client: &[u8], cport: &[u8], server: &[u8], sport: &[u8]| {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for part in [client, cport, server, sport] {
            for b in part {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        hash | 1
    };
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const RST: u8 = 0x04;
    match flags & (SYN | ACK | RST) {
        SYN => Some(Handshake::Syn(key(src, sport, dst, dport))),
        f if f == SYN | ACK => Some(Handshake::SynAck(key(dst, dport, src, sport))),
        _ => None,
    }
}
