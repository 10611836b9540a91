#![no_main]

// The decoders run under catch_unwind in inferd (a demuxer that panics on a hostile file
// refuses the file: symphonia 0.5 panics on a WAV header with a zero sample rate).
// libfuzzer-sys's panic hook would abort on those caught panics, so this target uses a
// silent hook instead; a panic that escapes still fails the run (fuzz_target! aborts on
// it).
libfuzzer_sys::fuzz_target!(
    init: {
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| inferd::fuzzing::audio(data)
);
