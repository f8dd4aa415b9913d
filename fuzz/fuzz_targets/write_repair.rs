#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tapjail_fuzz::write_repair(data);
});
