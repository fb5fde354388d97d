//! Queries in and answers out of a DNS socket by the batch: on Linux one
//! `recvmmsg` takes every query waiting (up to [`BATCH`]) and one
//! `sendmmsg` sends their answers; elsewhere one at a time. Buffers are
//! kept between batches, so a busy socket allocates nothing for them.

use std::io;
use std::net::{SocketAddr, UdpSocket};

/// Most queries one receive takes.
pub const BATCH: usize = 32;
/// Room for one query (a query needs far less; EDNS allows more).
const QUERY_ROOM: usize = 4096;

/// The queries one receive brought.
pub struct Incoming {
    bufs: Vec<Vec<u8>>,
    received: Vec<(usize, Option<SocketAddr>)>,
    #[cfg(target_os = "linux")]
    receiver: oasis_io::linux::mmsg::Receiver,
    #[cfg(target_os = "linux")]
    slots: Vec<oasis_io::linux::mmsg::Received>,
}

impl Default for Incoming {
    fn default() -> Self {
        Incoming {
            bufs: vec![vec![0; QUERY_ROOM]; BATCH],
            received: Vec::with_capacity(BATCH),
            #[cfg(target_os = "linux")]
            receiver: Default::default(),
            #[cfg(target_os = "linux")]
            slots: vec![Default::default(); BATCH],
        }
    }
}

impl Incoming {
    /// Waits for queries (as long as the socket's read timeout) and takes
    /// every one waiting; returns how many.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received.clear();
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let n = self
                .receiver
                .recv(socket.as_raw_fd(), &mut self.bufs, 0, &mut self.slots)?;
            self.received
                .extend(self.slots[..n].iter().map(|slot| (slot.len, slot.from)));
        }
        #[cfg(not(target_os = "linux"))]
        {
            let (len, from) = socket.recv_from(&mut self.bufs[0])?;
            self.received.push((len, Some(from)));
        }
        Ok(self.received.len())
    }

    /// Query `i` of the last receive, and who sent it.
    pub fn query(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let (len, from) = self.received[i];
        Some((&self.bufs[i][..len], from?))
    }
}

/// The answers to one batch of queries.
#[derive(Default)]
pub struct Outgoing {
    answers: Vec<Vec<u8>>,
    to: Vec<SocketAddr>,
    len: usize,
    #[cfg(target_os = "linux")]
    datagrams: oasis_io::linux::mmsg::Datagrams,
}

impl Outgoing {
    /// A cleared buffer for the next answer; it goes out once
    /// [`push`](Self::push) says to whom.
    pub fn slot(&mut self) -> &mut Vec<u8> {
        if self.answers.len() == self.len {
            self.answers.push(Vec::with_capacity(512));
        }
        let buf = &mut self.answers[self.len];
        buf.clear();
        buf
    }

    /// The buffer [`slot`](Self::slot) gave, filled, goes to `to`.
    pub fn push(&mut self, to: SocketAddr) {
        self.to.truncate(self.len);
        self.to.push(to);
        self.len += 1;
    }

    /// Sends the batch's answers; one the kernel refuses is dropped, as a
    /// busy network would drop it (the client asks again).
    pub fn send(&mut self, socket: &UdpSocket) {
        if self.len == 0 {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let mut batch = self.datagrams.batch();
            for (answer, to) in self.answers[..self.len].iter().zip(&self.to) {
                batch.push(answer, *to);
            }
            let (_, failed) = batch.send(socket.as_raw_fd());
            if failed > 0 {
                tracing::debug!(failed, "DNS answers the kernel refused to send");
            }
        }
        #[cfg(not(target_os = "linux"))]
        for (answer, to) in self.answers[..self.len].iter().zip(&self.to) {
            if let Err(e) = socket.send_to(answer, to) {
                tracing::debug!(%to, "sending a DNS answer: {e}");
            }
        }
        self.len = 0;
    }
}
