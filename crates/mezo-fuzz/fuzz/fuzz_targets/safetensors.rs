#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mezo_fuzz::safetensors(data));
