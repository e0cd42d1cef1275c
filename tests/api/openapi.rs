use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::TestEnv;

const COMMITTED: &str = include_str!("../../openapi/openapi.json");

#[test]
fn the_committed_spec_matches_the_code() {
    let generated = boxoffice::api::openapi_json();
    assert!(
        generated.trim() == COMMITTED.trim(),
        "openapi/openapi.json is stale; regenerate it with \
         `cargo run --quiet -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn every_error_response_is_documented_as_an_error_body() {
    let spec: Value = serde_json::from_str(COMMITTED).unwrap();
    assert_eq!(spec["servers"][0]["url"], "/", "relative server URL");
    let mut checked = 0;
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.starts_with('2') {
                    continue;
                }
                let schema = &response["content"]["application/json; charset=utf-8"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} error responses found");
}

#[tokio::test]
async fn the_spec_and_swagger_ui_are_served() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;

    let spec = app.get("/openapi.json").await;
    assert_eq!(spec.status, StatusCode::OK);
    assert_eq!(spec.body, serde_json::from_str::<Value>(COMMITTED).unwrap());

    let docs = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    // Never framed or sniffed; inline code runs only on this page (poem-openapi
    // writes Swagger UI inline), not on anything the API answers.
    let header = |r: &reqwest::Response, name: &str| r.headers()[name].to_str().unwrap().to_owned();
    let policy = header(&docs, "content-security-policy");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(policy.contains("script-src 'unsafe-inline'"), "{policy}");
    for path in ["/api/v1/event", "/openapi.json", "/nowhere", "/metrics"] {
        let answer = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(
            header(&answer, "content-security-policy"),
            "default-src 'none'; frame-ancestors 'none'",
            "{path}"
        );
        assert_eq!(header(&answer, "x-content-type-options"), "nosniff");
        assert_eq!(header(&answer, "referrer-policy"), "no-referrer");
    }
    assert_eq!(header(&docs, "x-content-type-options"), "nosniff");
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "Swagger UI page");
    assert!(
        !html.contains("cdn"),
        "assets come from the binary, not a CDN"
    );
}
