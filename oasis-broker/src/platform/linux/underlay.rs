//! The underlay carrier (OC0): diverted packets go back out through raw
//! sockets that carry the bypass mark, so the classifier lets them pass.

use oasis_io::linux::raw::{RawBatches, RawSockets};

use crate::platform::UnderlaySender;

pub struct RawUnderlay(pub RawSockets);

impl UnderlaySender for RawUnderlay {
    type Scratch = RawBatches;

    fn send<'p>(&self, scratch: &mut RawBatches, packets: impl Iterator<Item = &'p [u8]>) -> (usize, usize) {
        self.0.send(scratch, packets)
    }
}
