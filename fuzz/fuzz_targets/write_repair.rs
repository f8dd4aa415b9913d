#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tapjail_fuzz::write_repair(data);
});
