//! The control protocol: any line a client sends is a request or an
//! error, never a panic; a request survives its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oasis_broker::control::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(data) {
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
    }
    let _ = serde_json::from_slice::<Response>(data);
});
