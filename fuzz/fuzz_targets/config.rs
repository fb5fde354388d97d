//! The config file, hand-edited: any text loads or is refused with an
//! error; a loaded config saves to text that loads as the same config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use oasis_broker::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(Path::new("fuzz.yaml"), text) {
        let saved = serde_yaml::to_string(&config).unwrap();
        let again = Config::parse(Path::new("fuzz.yaml"), &saved).expect("a saved config loads");
        assert_eq!(again, config);
    }
});
