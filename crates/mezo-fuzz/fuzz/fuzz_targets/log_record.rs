#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mezo_fuzz::log_record(data));
