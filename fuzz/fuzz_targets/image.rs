#![no_main]

// Decoders run under catch_unwind in inferd (a panic refuses the file); this target
// silences the panic hook for those caught panics, and an escaping panic still fails.
libfuzzer_sys::fuzz_target!(
    init: {
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| inferd::fuzzing::image(data)
);
