//! Received datagrams, as any platform's batched receive reports them.

use std::net::SocketAddr;

/// What one receive buffer holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: Option<SocketAddr>,
    /// The size of each coalesced datagram when the kernel merged several
    /// from one sender (UDP GRO); 0 when the buffer holds one datagram.
    pub segment: usize,
}

/// The datagrams in a received buffer of `len` bytes: one, or several of
/// `segment` bytes each (the last may be shorter) when the kernel coalesced.
pub fn datagrams(len: usize, segment: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = if segment == 0 { len.max(1) } else { segment };
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesced_buffers_split_into_their_datagrams() {
        assert_eq!(datagrams(100, 0).collect::<Vec<_>>(), vec![0..100]);
        assert_eq!(
            datagrams(100, 40).collect::<Vec<_>>(),
            vec![0..40, 40..80, 80..100]
        );
        assert_eq!(datagrams(80, 40).collect::<Vec<_>>(), vec![0..40, 40..80]);
        assert_eq!(datagrams(0, 40).count(), 0);
    }
}
