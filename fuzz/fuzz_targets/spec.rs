//! Overlay specifications from anywhere on the Internet: any text is
//! refused with an error or gives a spec whose entries are sound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oasis_broker::overlay::OverlaySpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = OverlaySpec::parse(text) {
        assert!(spec.entries.len() <= 16);
        assert!(spec.shim_len <= oasis_common::MAX_SHIM_LEN);
        // Stored in the config file and read back, it is the same.
        let yaml = serde_json::to_string(&spec).unwrap();
        let again: OverlaySpec = serde_json::from_str(&yaml).unwrap();
        assert_eq!(again, spec);
    }
});
