#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tapjail_fuzz::control_frames(data);
});
