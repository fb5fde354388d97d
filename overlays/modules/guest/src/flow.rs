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
