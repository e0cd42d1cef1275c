use super::*;

#[test]
fn every_example_secret_of_the_shipped_files_is_refused() {
    let secret_yaml = include_str!("../../k8s/secret.yaml");
    for setting in [
        "ADMIN_TOKEN",
        "BOXOFFICE_BUYER_JWT_KEY",
        "BOXOFFICE_ADMISSION_KEY",
    ] {
        let value = secret_yaml
            .lines()
            .find_map(|line| line.trim().strip_prefix(setting)?.strip_prefix(": "))
            .unwrap_or_else(|| panic!("k8s/secret.yaml has no {setting}"));
        assert!(EXAMPLE_SECRETS.contains(&value), "{value} is not listed");
        assert!(weak_secret(setting, value, 0).is_some(), "{value}");
    }
}

#[test]
fn a_short_admin_token_is_refused_and_a_long_random_one_accepted() {
    assert!(weak_secret("ADMIN_TOKEN", "x", MIN_SECRET_BYTES).is_some());
    let why = weak_secret("ADMIN_TOKEN", "short", MIN_SECRET_BYTES).unwrap();
    assert!(why.contains("5 bytes") && why.contains("32"), "{why}");
    let random = "3f9c1a7be0d24c5f8a61b7e2d94c0a1f";
    assert_eq!(weak_secret("ADMIN_TOKEN", random, MIN_SECRET_BYTES), None);
}
