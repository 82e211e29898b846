//! The labels of `hami_build_info`, which HAMi's scheduler and its
//! vgpu-monitor both export (spec section 9).

/// `GOOS/GOARCH` as HAMi's `platform` label spells it.
pub fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// HAMi's build-info labels, in its order. `revision` and `build_date`
/// come from `HAMI_BUILD_REVISION` and `HAMI_BUILD_DATE` at compile time
/// when the build sets them; `go_version` is `none`, this is not a Go build.
pub fn labels() -> Vec<(&'static str, String)> {
    vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        (
            "revision",
            option_env!("HAMI_BUILD_REVISION")
                .unwrap_or("unknown")
                .to_string(),
        ),
        (
            "build_date",
            option_env!("HAMI_BUILD_DATE")
                .unwrap_or("unknown")
                .to_string(),
        ),
        ("go_version", "none".to_string()),
        ("compiler", "rustc".to_string()),
        ("platform", platform()),
    ]
}
