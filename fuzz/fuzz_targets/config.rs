#![no_main]
//! config.json (all layouts) and TOML training configs.
use gated_lm::io::hf::parse_config;
use gated_lm::train::config::TrainConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((cfg, _)) = parse_config(text, "fuzz") {
            // a config that validates must be usable: its parameter list is computable
            let _ = gated_lm::model::params::param_specs(&cfg);
        }
        let base = TrainConfig::preset("cpu-micro").unwrap();
        let _ = base.merge_toml(text, "fuzz");
    }
});
