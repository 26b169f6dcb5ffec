//! Service and NetworkPolicy manifests as users (and `meshd apply` requests to the apiserver)
//! bring them: any text. Invariant beyond "no panic": a refusal always says something, naming
//! the file it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = meshd_manifest::parse_str("fuzz.yaml", text) {
        assert!(!errors.0.is_empty(), "a refusal without a reason");
        let message = errors.to_string();
        assert!(message.contains("fuzz.yaml"), "an error that names no file: {message}");
    }
});
